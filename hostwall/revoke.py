"""Removing an owner's allow entries from policy files as text edits.

A YAML round trip (ruamel.yaml included) re-indents sequences and drops comments that
sit between the removed item and its neighbours. Cutting the removed items' lines out
of the text, located through PyYAML's node marks, leaves every other byte as the
operator wrote it: comments, order, quoting and blank lines.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from msgspec import Struct

from hostwall.errors import PolicyError, Problem
from hostwall.yamlsource import YamlError
from hostwall.yamlsource import load as load_located

try:
    _Loader: type[Any] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml is a declared system dependency
    _Loader = yaml.SafeLoader


class Removal(Struct, frozen=True):
    """One allow entry cut out of a file; lines are 1-based and inclusive."""

    service: str
    entry: str  # services.NAME.allow[i]
    subject: str  # "203.0.113.45/32" or "file: partner-c.txt"
    line: int  # where the entry starts
    first_line: int  # including the comment lines directly above it
    last_line: int


class FileEdit(Struct, frozen=True):
    path: str
    old: str
    new: str
    removals: tuple[Removal, ...]

    def diff(self) -> str:
        return "".join(difflib.unified_diff(self.old.splitlines(keepends=True), self.new.splitlines(keepends=True),
                                            fromfile=self.path, tofile=self.path))


def _scalar(node: yaml.Node | None) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _get(mapping: yaml.Node | None, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if not isinstance(mapping, yaml.MappingNode):
        return None
    for key_node, value_node in mapping.value:
        if _scalar(key_node) == key:
            return key_node, value_node
    return None


def _last_line(node: yaml.Node) -> int:
    """0-based line of the node's last scalar. A collection's own end mark lies at the next
    token, past any comment lines that follow it, so only scalars say where content ends."""
    if isinstance(node, yaml.MappingNode):
        return max((_last_line(v) for pair in node.value for v in pair), default=node.start_mark.line)
    if isinstance(node, yaml.SequenceNode):
        return max((_last_line(v) for v in node.value), default=node.start_mark.line)
    # A block scalar's end mark is at column 0 of the line after it.
    return node.end_mark.line if node.end_mark.column > 0 else node.end_mark.line - 1


def _edit_error(path: str, line: int, entry: str, message: str) -> PolicyError:
    return PolicyError([Problem(path, line, entry, message)])


def remove_owner(text: str, path: str, owner: str) -> FileEdit:
    """The file's text without the allow entries owned by owner."""
    try:
        load_located(text)  # the same strictness (duplicate keys, aliases) as loading
        root = yaml.compose(text, Loader=_Loader)
    except (YamlError, yaml.YAMLError) as exc:
        raise _edit_error(path, getattr(exc, "line", None) or 1, "", f"cannot edit: {exc}") from exc
    lines = text.splitlines(keepends=True)
    drop: set[int] = set()
    emptied: list[yaml.Node] = []
    removals: list[Removal] = []
    services = _get(root, "services")
    for service_key, service in services[1].value if services and isinstance(services[1], yaml.MappingNode) else []:
        allow = _get(service, "allow")
        if allow is None or not isinstance(allow[1], yaml.SequenceNode):
            continue
        key_node, sequence = allow
        name = _scalar(service_key) or "?"
        owned = [(i, item) for i, item in enumerate(sequence.value) if _scalar(_owner(item)) == owner]
        if not owned:
            continue
        if isinstance(sequence, yaml.SequenceNode) and sequence.flow_style:
            raise _edit_error(path, sequence.start_mark.line + 1, f"services.{name}.allow",
                              "cannot cut entries out of a flow-style list ([...]); write it as a block list "
                              "(one '- cidr: ...' item a line) first")
        for index, item in owned:
            first, last = _item_lines(lines, item)
            drop.update(range(first, last + 1))
            cidr, file = _scalar(_value(item, "cidr")), _scalar(_value(item, "file"))
            removals.append(Removal(name, f"services.{name}.allow[{index}]",
                                    cidr if cidr is not None else f"file: {file}",
                                    item.start_mark.line + 1, first + 1, last + 1))
        if len(owned) == len(sequence.value):
            emptied.append(key_node)
    for key_node in emptied:
        # An allow: key with nothing under it is null, which the policy refuses; [] is valid.
        row, column = key_node.end_mark.line, key_node.end_mark.column
        colon = lines[row].index(":", column)
        lines[row] = lines[row][:colon + 1] + " []" + lines[row][colon + 1:]
    new = "".join(line for number, line in enumerate(lines) if number not in drop)
    return FileEdit(path, text, new, tuple(removals))


def _value(item: yaml.Node, key: str) -> yaml.Node | None:
    found = _get(item, key)
    return found[1] if found else None


def _owner(item: yaml.Node) -> yaml.Node | None:
    return _value(item, "owner")


def _item_lines(lines: list[str], item: yaml.Node) -> tuple[int, int]:
    """0-based first and last line of a block sequence item: from its dash (and the comment
    lines directly above, which describe it) to its last value."""
    first = item.start_mark.line
    while first > 0 and not lines[first].lstrip().startswith("-"):
        first -= 1  # "-" alone on the line before the mapping
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return first, _last_line(item)
