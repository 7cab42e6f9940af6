"""PyYAML's C parser for the documents the block reader leaves (hostwall.yamlblock).

A plain document (no anchors, aliases or explicit tags, and nothing wrong in it) is built
straight from the parser's events, which costs two thirds of composing its node graph
first; any other document is composed and built from its nodes, which is also where
every error is found and worded. Each reader gives (data, line of the root, lines of the
children), which hostwall.yamlsource.LocatedData holds.
"""

from __future__ import annotations

from typing import Any

import yaml

from hostwall import yamlcore
from hostwall.yamlcore import STR, ChildLines, YamlError, scalar

try:
    _SafeLoader: type[Any] = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml is a declared system dependency
    _SafeLoader = yaml.SafeLoader


class _Loader(_SafeLoader):  # type: ignore[misc]
    """The safe loader, resolving the tag of each distinct plain scalar once.

    Even libyaml's composer calls resolve() in Python for every node, trying regular
    expressions on each plain scalar, and a policy repeats a few keys and values
    (owner, reason, review_by and their values) thousands of times. Without path
    resolvers, which the safe loader has none of, a plain scalar's tag depends on its
    text alone.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._plain_tags: dict[str, str] | None = None if self.yaml_path_resolvers else {}

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
        tags = self._plain_tags
        if tags is None or kind is not yaml.ScalarNode or not implicit[0]:
            return super().resolve(kind, value, implicit)  # type: ignore[no-any-return]
        tag = tags.get(value)
        if tag is None:
            tag = tags[value] = super().resolve(kind, value, implicit)
        return tag


Read = tuple[Any, int | None, dict[int, ChildLines]]


def load(text: str) -> Read:
    """(data, the root's line, the lines of the children) of any document; YamlError for
    what is wrong with it."""
    try:
        return _load_plain(text)
    except Exception:  # noqa: BLE001 - not plain, or not valid: the node path decides and says why
        pass
    root = _compose(text)
    if root is None:
        return {}, None, {}
    try:
        # The expansion check walks every node a second time, and only aliases give it
        # something to find: the first repeated mapping or sequence (an alias bomb, a
        # cycle) stops this build within the document's own nodes, and an alias to a
        # scalar adds one node, within the budget. After any error the thorough path
        # runs as well, so that errors come in the order it finds them.
        return _located(root, seen=set())
    except (_Repeated, YamlError):
        _check_expansion(root, {}, set(), 0)
        return _located(root, seen=None)


class _Repeated(Exception):
    """A mapping or sequence reached a second time, through an alias."""


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_Loader)
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


class _NotPlain(Exception):
    """The document has something the event path leaves to the node path."""


_NO_KEY = object()
_ScalarEvent, _MappingStartEvent, _SequenceStartEvent = (
    yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSING_EVENTS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _load_plain(text: str) -> Read:
    """The document built from the parser's events, with the data, lines and key checks
    of _build; _NotPlain (or the parser's error) for anything else.

    Each open mapping or sequence is a stack entry [container, lines of its children,
    the key waiting for its value]; a node's depth is the number of entries above it.
    """
    loader = _Loader(text)
    try:
        next_event = loader.get_event
        next_event()  # the stream's start
        if not isinstance(next_event(), yaml.DocumentStartEvent):
            return {}, None, {}  # no document: what composing gives
        tags = loader._plain_tags
        if tags is None:
            raise _NotPlain
        resolve, scalar_node, value_of = loader.resolve, yaml.ScalarNode, scalar
        max_nodes, max_depth = yamlcore.MAX_NODES, yamlcore.MAX_DEPTH
        children: dict[int, ChildLines] = {}
        stack: list[list[Any]] = []
        nodes = 0
        while True:
            event = next_event()
            kind = type(event)
            if kind in _CLOSING_EVENTS:
                container, lines, _ = stack.pop()
                children[id(container)] = lines
                if stack:
                    continue
                root: Any = container
                break
            nodes += 1
            if event.anchor is not None or event.tag is not None or nodes > max_nodes or len(stack) > max_depth:
                raise _NotPlain
            line = event.start_mark.line + 1
            if kind is _ScalarEvent:
                item = value = event.value
                if event.implicit[0]:
                    tag = tags.get(value) or resolve(scalar_node, value, event.implicit)
                    if tag != STR:
                        item = value_of(tag, value)
            elif kind is _MappingStartEvent:
                item = {}
            elif kind is _SequenceStartEvent:
                item = []
            else:
                raise _NotPlain
            if not stack:
                root_line = line
                if kind is _ScalarEvent:
                    root = item
                    break
            else:
                top = stack[-1]
                parent, lines, key = top
                if type(parent) is list:
                    lines[len(parent)] = line
                    parent.append(item)
                elif key is _NO_KEY:
                    if kind is not _ScalarEvent or not isinstance(item, (str, int)) or item in parent or item == "<<":
                        raise _NotPlain  # the node path says what is wrong with the key
                    lines[item] = line
                    top[2] = item
                else:
                    parent[key] = item
                    top[2] = _NO_KEY
            if kind is not _ScalarEvent:
                stack.append([item, {}, _NO_KEY])
        if not isinstance(next_event(), yaml.DocumentEndEvent) or not isinstance(next_event(), yaml.StreamEndEvent):
            raise _NotPlain  # a second document: the node path refuses it
        return root, root_line, children
    finally:
        loader.dispose()


def _located(root: yaml.Node, seen: set[int] | None) -> Read:
    children: dict[int, ChildLines] = {}
    data = _build(root, children, [yamlcore.MAX_NODES], 0, seen)
    return data, root.start_mark.line + 1, children


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
    if depth > yamlcore.MAX_DEPTH:
        raise YamlError(f"nesting deeper than {yamlcore.MAX_DEPTH} levels", line)
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
    if size > yamlcore.MAX_NODES:
        raise YamlError(
            f"aliases expand the document to more than {yamlcore.MAX_NODES} nodes (alias bomb?); "
            "write the values out instead of repeating anchors",
            line,
        )
    sizes[id(node)] = size
    return size


def _build(
    node: yaml.Node, children: dict[int, ChildLines], budget: list[int], depth: int,
    seen: set[int] | None,
) -> Any:
    """The data of node; with seen, _Repeated when a mapping or sequence comes round again."""
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError("the document expands to too many nodes (alias bomb?)", node.start_mark.line + 1)
    if depth > yamlcore.MAX_DEPTH:
        raise YamlError(f"nesting deeper than {yamlcore.MAX_DEPTH} levels", node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return node.value if node.tag == STR else scalar(node.tag, node.value)
    if seen is not None:
        if id(node) in seen:
            raise _Repeated
        seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        items = [_build(child, children, budget, depth + 1, seen) for child in node.value]
        children[id(items)] = {index: child.start_mark.line + 1 for index, child in enumerate(node.value)}
        return items
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise YamlError("merge keys (<<) are not supported; write the keys out", key_node.start_mark.line + 1)
            # The dict or list of a key is refused below and dropped, and its id may be
            # reused at once: its lines must not land in children.
            key_children = children if isinstance(key_node, yaml.ScalarNode) else {}
            key = _build(key_node, key_children, budget, depth + 1, seen)
            if not isinstance(key, str | int):
                raise YamlError("mapping keys must be plain strings", key_node.start_mark.line + 1)
            if key in mapping:
                raise YamlError(
                    f"key {key!r} appears twice in the same mapping; keep one",
                    key_node.start_mark.line + 1,
                )
            lines[key] = key_node.start_mark.line + 1
            mapping[key] = _build(value_node, children, budget, depth + 1, seen)
        children[id(mapping)] = lines
        return mapping
    raise YamlError(f"unsupported YAML node {node.tag}", node.start_mark.line + 1)  # pragma: no cover


