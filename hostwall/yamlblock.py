"""The common shape of a policy file read without PyYAML's parser: block mappings and
sequences of plain scalars, one entry a line, as tools write long inline allowlists
(and one-line flow sequences such as "ports: [443, 8443]").

libyaml parses fast, but hands every event to Python as an object with two marks: a
10k-entry inline policy is 125k events and about 0.4 s. Here one regular expression
takes every line apart at C speed and one loop builds the data, with the same lines,
tags and values as yamlnodes' event path, in a half to a third of that time. A long
run of sequence items of one shape (an inline allowlist: the same keys in the same
order, one "key: value" a line) is taken apart an item at a time by an expression made
for that shape, which takes another third off.

Anything outside that shape, or anything wrong, gives None, and the caller reads the
document with libyaml as always (which also finds and words every error): a quoted,
multi-line or non-ASCII scalar, a flow mapping, a flow sequence of anything else, a
tab, an anchor, alias or tag, a second document, a repeated key, a key that is not a
plain string, an empty value, a document past the node or depth limits. A scalar
here is what libyaml would take for one plain scalar in block context, in a safe
subset: ASCII, no indicator first, no "#", brackets or braces, no ": " or trailing
":", single spaces inside.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from hostwall.yamlcore import ChildLines, Lines

# A plain scalar: no indicator first, then no comment start, no mapping indicator (a
# colon before a space or the end) and no runs of spaces. Each step is a run of safe
# characters, so the expression does not backtrack character by character.
_SAFE = r"[^\s#:\[\]{}]"
_VALUE = rf"(?:[A-Za-z0-9_./+(~]|-(?=\S)){_SAFE}*(?:(?::(?=\S)| (?=[^\s#])){_SAFE}*)*"
_KEY = r"[A-Za-z_][A-Za-z0-9_-]*"
# An item of a one-line flow sequence ("ports: [443, 8443]"): a plain scalar that needs
# no care in flow context (no space, comma, colon, bracket or brace).
_FLOW_ITEM = r"[A-Za-z0-9_./+~][A-Za-z0-9_./+~-]*"
# indent, "- " of an item holding a mapping, key, then its value or the "[" and the items
# of a flow sequence; or "- " of an item, its scalar. A line holds one of them, or
# nothing but a comment or white space.
_LINE = re.compile(
    rf"^( *)(?:(?:(- +)?({_KEY}):(?: +(?:({_VALUE})|(\[) *((?:{_FLOW_ITEM}(?: *, *{_FLOW_ITEM})*)?) *\]))?"
    rf"|(- +)({_VALUE}))(?: +#.*)? *|#.*)?$",
    re.MULTILINE,
)

# Lines are taken apart a slice of the text at a time, so that the matches of a large
# document do not all exist at once.
_SLICE_CHARACTERS = 65536
_REFUSED = (None, "", "", "", "", "", "", "")


def _rows(text: str, start: int, stop: int) -> Iterator[tuple[str | None, str, str, str, str, str, str, str]]:
    """The groups of _LINE for each line of text[start:stop], in order; a row of None in
    place of the rest once a line does not match."""
    while True:
        end = text.find("\n", start + _SLICE_CHARACTERS, stop)
        end = stop if end < 0 else end
        rows = _LINE.findall(text, start, end)
        # Each line is one match or none, so a line the expression refused leaves one short.
        if len(rows) != text.count("\n", start, end) + 1:
            yield _REFUSED
            return
        yield from rows
        if end == stop:
            return
        start = end + 1


# The first item of a sequence of mappings, at any column: "- key: value", then its other
# "key: value" lines two columns deeper. A run of items of the same shape after it (the
# same column, keys and order, one "key: value" a line: an inline allowlist) is taken
# apart by an expression made for that shape, an item at a time, instead of a line.
_SHORTEST_RUN = 2  # items after the first, taken together
_ITEM_HEAD = re.compile(rf"^( *)- ({_KEY}): {_VALUE}\n((?:\1  {_KEY}: {_VALUE}\n)*+)", re.MULTILINE)


class _Shape:
    """Items of one column and key order: the expressions for one such item (its values
    as groups) and for a run of them, and the keys' offsets from the item's first line."""

    __slots__ = ("column", "item", "keys", "lines", "offsets", "run")

    def __init__(self, column: int, keys: tuple[str, ...]) -> None:
        def item(value: str) -> str:
            pad = " " * column
            names = [re.escape(key) for key in keys]  # only _KEY's characters; escaped all the same
            return "".join((f"{pad}- {names[0]}: {value}\n", *(f"{pad}  {name}: {value}\n" for name in names[1:])))

        self.column = column
        self.keys = keys
        self.lines = len(keys)
        self.offsets = {key: offset for offset, key in enumerate(keys)}
        self.item = re.compile(item(f"({_VALUE})"))
        # Possessive: a run never gives an item back, so nothing is kept for backtracking.
        self.run = re.compile(f"(?:{item(_VALUE)}){{{_SHORTEST_RUN},}}+")


_shape = functools.lru_cache(maxsize=64)(_Shape)
# Past this many shapes in one document, the rest of it goes line by line: each shape
# costs an expression to compile.
_SHAPES_A_DOCUMENT = 16


def _keys(head: re.Match[str]) -> tuple[str, ...]:
    return (head[2], *(row.partition(":")[0].lstrip(" ") for row in head[3].splitlines()))


def _pieces(text: str) -> Iterator[tuple[int, int, int, _Shape | None]]:
    """(start, stop, first line, None) for lines to take apart one at a time, and
    (start, stop, first line, shape) for a run of items of that shape, in order."""
    start, line, search = 0, 1, 0
    shapes: set[_Shape] = set()
    while len(shapes) < _SHAPES_A_DOCUMENT and (head := _ITEM_HEAD.search(text, search)) is not None:
        search = head.end()
        keys = _keys(head)
        second = _ITEM_HEAD.match(text, search)
        if second is None or second[1] != head[1] or _keys(second) != keys or len(set(keys)) != len(keys):
            continue  # no run, or a repeated key, which the line path refuses
        shape = _shape(len(head[1]), keys)
        shapes.add(shape)
        run = shape.run.match(text, search)
        if run is None:
            continue
        # The first item goes the line path, which checks that it is an item where it
        # stands; the run continues from where that left the blocks.
        yield start, search - 1, line, None
        line += text.count("\n", start, search)
        yield search, run.end(), line, shape
        line += text.count("\n", search, run.end())
        start = search = run.end()
    if start < len(text):
        yield start, len(text), line, None


class _Values(dict[str, Any]):
    """The value of each distinct scalar text, made once: a policy repeats its keys and
    most values (owners, reasons, dates) thousands of times, and values are immutable."""

    def __init__(self, scalar: Callable[[str], Any]) -> None:
        super().__init__()
        self._scalar = scalar

    def __missing__(self, text: str) -> Any:
        value = self[text] = self._scalar(text)
        return value


class _Block:
    """An open mapping or sequence: its column, what it holds, the lines of its
    children, and whether it is a sequence at its parent key's own column."""

    __slots__ = ("column", "container", "indentless", "lines")

    def __init__(self, column: int, container: dict[str, Any] | list[Any], indentless: bool = False) -> None:
        self.column = column
        self.container = container
        self.lines: Lines = {}
        self.indentless = indentless


def read_block(
    text: str, scalar: Callable[[str], Any], strings: Callable[[list[str]], bool], max_nodes: int, max_depth: int,
) -> tuple[dict[str, Any], int, dict[int, ChildLines]] | None:
    """(data, the root's line, the lines of the children of each mapping and sequence by
    the id of the dict or list built) of a block document whose root is a mapping, as
    yamlsource.LocatedData holds them; None for anything else. scalar(text) is a plain
    scalar's value (the loader's implicit tags); a key must stay a str. strings(texts):
    True only if each of them is its own value, scalar(text) == text as a str."""
    if not text.isascii() or "\t" in text or "\r" in text or "\0" in text:
        return None
    # A line is at most three nodes (an item's mapping, a key, its value), and a flow
    # sequence one more for each item: past the limit libyaml's path says what is wrong.
    budget = max_nodes - 3 * (text.count("\n") + 1)
    if budget < 0:
        return None
    values = _Values(scalar)
    children: dict[int, ChildLines] = {}
    stack: list[_Block] = []
    waiting: tuple[_Block, str] | None = None  # a key given no value on its own line
    root_line = 0
    block: _Block | None = None  # the innermost open block
    for start, stop, first_line, shape in _pieces(text):
        if shape is not None:
            block = _take_run(text, start, stop, first_line, shape, stack, values, children, strings)
            if block is None:  # pragma: no cover - the item before the run is its first
                return None
            continue
        rows = _rows(text, start, stop)
        for number, (indent, item_dash, key, value, flow, flow_items, scalar_dash, item) in enumerate(rows, first_line):
            if indent is None:
                return None  # a line the expression refused
            # The common line, another key with its value in the innermost mapping, changes no
            # block: it goes straight to its key.
            if not (value and not item_dash and waiting is None and block is not None
                    and len(indent) == block.column and type(block.container) is dict):
                if not key and not scalar_dash:
                    continue  # blank, or only a comment
                column, dash = len(indent), item_dash or scalar_dash
                if waiting is not None:
                    parent, parent_key = waiting
                    waiting = None
                    indentless = bool(dash) and column == parent.column
                    if column <= parent.column and not indentless:
                        return None  # an empty value: null, or an error
                    opened = _Block(column, [] if dash else {}, indentless)
                    assert isinstance(parent.container, dict)
                    parent.container[parent_key] = opened.container
                    children[id(opened.container)] = opened.lines
                    stack.append(opened)
                elif not stack:
                    if dash:
                        return None  # a sequence at the root
                    root_line = number
                    stack.append(_Block(column, {}))
                    children[id(stack[0].container)] = stack[0].lines
                else:
                    # A line back at an outer column closes the blocks inside it; an indentless
                    # sequence also ends at its key's column on a line that is not an item.
                    while len(stack) > 1 and (stack[-1].column > column
                                              or (stack[-1].indentless and stack[-1].column == column and not dash)):
                        stack.pop()
                    if stack[-1].column != column:
                        return None  # deeper than a scalar allows, or between two columns
                if len(stack) + bool(dash and key) > max_depth:  # an item's mapping is one level deeper
                    return None
                block = stack[-1]
                if dash:
                    if not isinstance(block.container, list):
                        return None
                    block.lines[len(block.container)] = number
                    if not key:
                        block.container.append(values[item])
                        continue
                    mapping: dict[str, Any] = {}
                    block.container.append(mapping)
                    block = _Block(column + len(dash), mapping)
                    children[id(mapping)] = block.lines
                    stack.append(block)
            container = block.container
            if not isinstance(container, dict):
                return None  # a key among the items of a sequence
            name = values[key]
            if type(name) is not str or name in container:
                return None  # a key that is not a string (on: is True), or a repeated key
            block.lines[name] = number
            if value:
                container[name] = values[value]
            elif flow:
                items = [values[part.strip(" ")] for part in flow_items.split(",")] if flow_items else []
                budget -= len(items)
                if budget < 0 or len(stack) >= max_depth:  # its items are one level deeper
                    return None
                container[name] = items
                children[id(items)] = dict.fromkeys(range(len(items)), number)
            else:
                waiting = (block, name)
    if waiting is not None or not stack:
        return None
    root = stack[0].container
    assert isinstance(root, dict)
    return root, root_line, children


def _take_run(text: str, start: int, stop: int, first_line: int, shape: _Shape, stack: list[_Block],
              values: _Values, children: dict[int, ChildLines], strings: Callable[[list[str]], bool]
              ) -> _Block | None:
    """The items of a run, from text[start:stop], appended to the sequence open below the
    item before them, as the line path would append them; the block of the last one,
    left open as the line path leaves it.

    The line path read that item, of the same shape and column, so it has checked what
    the run's items hold in common: where they stand, that their keys are strings, and
    the depth. The item's own block is the only one open inside the sequence."""
    stack.pop()
    sequence = stack[-1]
    items, keys = sequence.container, shape.keys
    if type(items) is not list or sequence.column != shape.column:
        return None
    rows = shape.item.findall(text, start, stop)
    if shape.lines == 1:
        rows = [(row,) for row in rows]
    # Most columns (addresses, owners, reasons, dates) hold only text that no implicit
    # tag could match, which is its own value: checked a column at a time, once for each
    # distinct text, the items are then made of the texts as they are.
    as_they_are = all(strings(list(set(map(itemgetter(column), rows)))) for column in range(shape.lines))
    item_lines, count, line, offsets = sequence.lines, shape.lines, first_line, shape.offsets
    mapping: dict[str, Any] = {}
    for row in rows:
        mapping = dict(zip(keys, row if as_they_are else map(values.__getitem__, row), strict=False))
        item_lines[len(items)] = line
        items.append(mapping)
        children[id(mapping)] = (line, offsets)
        line += count
    # The line path may add keys to the last item: its lines become its own.
    last = _Block(shape.column + 2, mapping)
    last.lines = {key: line - count + offset for key, offset in offsets.items()}
    children[id(mapping)] = last.lines
    stack.append(last)
    return last
