"""YAML to plain data, keeping the line of every node so that errors can point at it.

PyYAML's constructors lose positions and silently let a repeated key win; building
the data here from the C parser keeps both honest, and bounds what aliases can expand
to (a "billion laughs" file fails fast instead of eating memory).

A document in the block shape tools write (hostwall.yamlblock) is read without the
parser at all. Any other plain document (no anchors, aliases or explicit tags, and
nothing wrong in it) is built straight from the parser's events, which costs two thirds
of composing its node graph first; any other document is composed and built from its
nodes, which is also where every error is found and worded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml
from msgspec import Struct, field

from hostwall.errors import Problem
from hostwall.yamlblock import read_block

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


Path = tuple[str | int, ...]
MAX_NODES = 2_000_000
MAX_DEPTH = 64


class YamlError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


# The lines of a mapping's keys or a sequence's items; or, for an item of a run of one
# shape (hostwall.yamlblock), its first line and each key's offset from it, which every
# item of the run shares.
Lines = dict[Any, int] | tuple[int, dict[Any, int]]


class LocatedData(Struct):
    data: Any
    line: int | None = None  # of the document's root node
    # The lines of the children of every mapping and sequence built from the document, by
    # the id of the dict or list built (data keeps each alive), then by key (the line of
    # the key) or index. line_of walks data along a path, so paths are made only for the
    # lines that are asked for.
    children: dict[int, Lines] = field(default_factory=dict)

    def line_of(self, path: Path) -> int | None:
        """The line of the deepest known node on the way to path."""
        node, line = self.data, self.line
        for part in path:
            known = _line(self.children.get(id(node)), part)
            if known is None:
                break
            line, node = known, node[part]
        return line

    def item_lines(self, path: Path, count: int) -> list[int | None]:
        """line_of(path + (index,)) for each index below count, walking to path once: a
        policy's allow list may hold thousands of entries."""
        node, line = self.data, self.line
        for part in path:
            known = _line(self.children.get(id(node)), part)
            if known is None:
                return [line] * count
            line, node = known, node[part]
        items = self.children.get(id(node))
        return [items.get(index, line) for index in range(count)] if type(items) is dict else [line] * count


def _line(lines: Lines | None, part: str | int) -> int | None:
    if isinstance(lines, tuple):
        first, offsets = lines
        offset = offsets.get(part)
        return None if offset is None else first + offset
    return None if lines is None else lines.get(part)


class _Repeated(Exception):
    """A mapping or sequence reached a second time, through an alias."""


_STR = "tag:yaml.org,2002:str"
_SCALAR_TAGS = {
    "tag:yaml.org,2002:int": int,
    "tag:yaml.org,2002:float": float,
}


def document(name: str, text: str) -> LocatedData | Problem:
    """The policy file name's text loaded, or what is wrong with it as YAML."""
    try:
        return load(text)
    except YamlError as exc:
        return Problem(name, exc.line, "", str(exc))


def load(text: str) -> LocatedData:
    block = read_block(text, _plain_scalars(), _all_strings, MAX_NODES, MAX_DEPTH)
    if block is not None:
        return LocatedData(*block)
    try:
        return _load_plain(text)
    except Exception:  # noqa: BLE001 - not plain, or not valid: the node path decides and says why
        pass
    root = _compose(text)
    if root is None:
        return LocatedData({})
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


# Whether any of the loader's implicit resolvers could give a plain scalar another tag
# than str: their expressions in one, each with its own flags. Most scalars of a large
# policy are distinct addresses that none of them matches.
_MAYBE_TAGGED = re.compile("|".join(sorted({
    f"(?{'x' if expression.flags & re.VERBOSE else ''}:{expression.pattern})"
    for resolvers in _Loader.yaml_implicit_resolvers.values() for _, expression in resolvers
})))


# Every character that the implicit tags' expressions can match (tests/unit/test_yamlblock.py
# reads them off the expressions): a text with any other, such as the "/" of every CIDR
# or most letters, is a string.
_TAGGABLE_CHARACTERS = "\t !&*+-.0123456789:<=ABCDEFILNORSTUYZ_abcdefilnorstuxy~"
_ONLY_TAGGABLE = re.compile(f"^[{re.escape(_TAGGABLE_CHARACTERS)}]*$", re.MULTILINE)


def _all_strings(texts: list[str]) -> bool:
    """Whether each of texts (of one line each) is its own value, a str: a timestamp stays
    one, and so does every text no implicit tag matches. A column of 10k addresses is one
    scan for lines an expression could match at all, instead of 10k tries of them."""
    if not texts:
        return True
    value = _plain_scalars()
    return all(type(own := value(text)) is str and own == text
               for text in set(_ONLY_TAGGABLE.findall("\n".join(texts))))


def _plain_scalars() -> Callable[[str], Any]:
    """The value of a plain scalar's text as _load_plain makes it, by its implicit tag."""
    resolve, node, maybe_tagged = _Loader("").resolve, yaml.ScalarNode, _MAYBE_TAGGED.match

    def value(text: str) -> Any:
        tag = resolve(node, text, (True, False)) if maybe_tagged(text) else _STR
        return text if tag == _STR else _scalar(tag, text)

    return value


class _NotPlain(Exception):
    """The document has something the event path leaves to the node path."""


_NO_KEY = object()
_ScalarEvent, _MappingStartEvent, _SequenceStartEvent = (
    yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSING_EVENTS = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _load_plain(text: str) -> LocatedData:
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
            return LocatedData({})  # no document: what composing gives
        tags = loader._plain_tags
        if tags is None:
            raise _NotPlain
        resolve, scalar_node, scalar = loader.resolve, yaml.ScalarNode, _scalar
        max_nodes, max_depth = MAX_NODES, MAX_DEPTH
        children: dict[int, Lines] = {}
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
                    if tag != _STR:
                        item = scalar(tag, value)
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
        return LocatedData(root, root_line, children)
    finally:
        loader.dispose()


def _located(root: yaml.Node, seen: set[int] | None) -> LocatedData:
    located = LocatedData(None, root.start_mark.line + 1)
    located.data = _build(root, located.children, [MAX_NODES], 0, seen)
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


def _build(
    node: yaml.Node, children: dict[int, Lines], budget: list[int], depth: int,
    seen: set[int] | None,
) -> Any:
    """The data of node; with seen, _Repeated when a mapping or sequence comes round again."""
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError("the document expands to too many nodes (alias bomb?)", node.start_mark.line + 1)
    if depth > MAX_DEPTH:
        raise YamlError(f"nesting deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        return node.value if node.tag == _STR else _scalar(node.tag, node.value)
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


def _scalar(tag: str, value: str) -> Any:
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
