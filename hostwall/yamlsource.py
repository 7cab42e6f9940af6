"""YAML to plain data, keeping the line of every node so that errors can point at it.

PyYAML's constructors lose positions and silently let a repeated key win; composing
the node graph with the C loader and building the data here keeps both honest, and
bounds what aliases can expand to (a "billion laughs" file fails fast instead of
eating memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

try:
    _Loader: type[Any] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml is a declared system dependency
    _Loader = yaml.SafeLoader

Path = tuple[str | int, ...]
MAX_NODES = 2_000_000
MAX_DEPTH = 64


class YamlError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


@dataclass
class LocatedData:
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """The line of the deepest known node on the way to path."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None


_SCALAR_TAGS = {
    "tag:yaml.org,2002:int": int,
    "tag:yaml.org,2002:float": float,
}


def load(text: str) -> LocatedData:
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise YamlError(f"not valid YAML: {' '.join(str(exc.problem or exc).split())}", line) from exc
    except yaml.reader.ReaderError as exc:
        # Raised before any node exists, with a character offset instead of a mark.
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlError(f"not valid YAML: control character U+{code:04X} is not allowed; remove it", line) from exc
    except yaml.YAMLError as exc:
        raise YamlError(f"not valid YAML: {' '.join(str(exc).split())}", None) from exc
    located = LocatedData(None)
    if root is None:
        located.data = {}
        return located
    _check_expansion(root, {}, set(), 0)
    budget = [MAX_NODES]
    located.data = _build(root, (), located.lines, budget, 0)
    return located


def _check_expansion(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], depth: int) -> int:
    """How many nodes the document expands to, counted without expanding it.

    An alias is the same node object as its anchor, so memoising by identity costs one
    visit per distinct node: a "billion laughs" file is refused in microseconds instead
    of after building millions of objects.
    """
    known = sizes.get(id(node))
    if known is not None:
        return known
    line = node.start_mark.line + 1
    if depth > MAX_DEPTH:
        raise YamlError(f"nesting deeper than {MAX_DEPTH} levels", line)
    if id(node) in open_nodes:
        raise YamlError("an alias refers to a node that contains it; write the values out", line)
    open_nodes.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_check_expansion(child, sizes, open_nodes, depth + 1) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            size += _check_expansion(key_node, sizes, open_nodes, depth + 1)
            size += _check_expansion(value_node, sizes, open_nodes, depth + 1)
    open_nodes.discard(id(node))
    if size > MAX_NODES:
        raise YamlError(
            f"aliases expand the document to more than {MAX_NODES} nodes (alias bomb?); "
            "write the values out instead of repeating anchors",
            line,
        )
    sizes[id(node)] = size
    return size


def _build(node: yaml.Node, path: Path, lines: dict[Path, int], budget: list[int], depth: int) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError("the document expands to too many nodes (alias bomb?)", node.start_mark.line + 1)
    if depth > MAX_DEPTH:
        raise YamlError(f"nesting deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(child, (*path, index), lines, budget, depth + 1)
            for index, child in enumerate(node.value)
        ]
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError("merge keys (<<) are not supported; write the keys out", key_node.start_mark.line + 1)
            key = _build(key_node, (*path, "<key>"), {}, budget, depth + 1)
            if not isinstance(key, str | int):
                raise YamlError("mapping keys must be plain strings", key_node.start_mark.line + 1)
            if key in mapping:
                raise YamlError(
                    f"key {key!r} appears twice in the same mapping; keep one",
                    key_node.start_mark.line + 1,
                )
            lines[(*path, key)] = key_node.start_mark.line + 1
            mapping[key] = _build(value_node, (*path, key), lines, budget, depth + 1)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return mapping
    raise YamlError(f"unsupported YAML node {node.tag}", node.start_mark.line + 1)  # pragma: no cover


def _scalar(node: yaml.ScalarNode) -> Any:
    tag = node.tag
    value: str = node.value
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() in ("true", "yes", "on")
    converter = _SCALAR_TAGS.get(tag)
    if converter is not None:
        try:
            return converter(value.replace("_", ""))
        except ValueError:
            return value
    # Timestamps stay strings: pydantic parses them with explicit rules about time zones.
    return value
