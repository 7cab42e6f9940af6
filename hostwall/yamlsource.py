"""YAML to plain data, keeping the line of every node so that errors can point at it.

PyYAML's constructors lose positions and silently let a repeated key win; building
the data here keeps both honest, and bounds what aliases can expand to (a "billion
laughs" file fails fast instead of eating memory).

A document in the block shape tools write (hostwall.yamlblock) is read without PyYAML
at all; any other is left to PyYAML's C parser (hostwall.yamlnodes), imported only then.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from hostwall import yamlcore
from hostwall.errors import Problem
from hostwall.yamlblock import read_block
from hostwall.yamlcore import ChildLines, YamlError, all_strings, plain_scalar

__all__ = ["LocatedData", "Path", "YamlError", "document", "load"]

Path = tuple[str | int, ...]


class LocatedData(Struct):
    data: Any
    line: int | None = None  # of the document's root node
    # The lines of the children of every mapping and sequence built from the document, by
    # the id of the dict or list built (data keeps each alive), then by key (the line of
    # the key) or index. line_of walks data along a path, so paths are made only for the
    # lines that are asked for.
    children: dict[int, ChildLines] = field(default_factory=dict)

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


def _line(lines: ChildLines | None, part: str | int) -> int | None:
    if isinstance(lines, tuple):
        first, offsets = lines
        offset = offsets.get(part)
        return None if offset is None else first + offset
    return None if lines is None else lines.get(part)


def document(name: str, text: str) -> LocatedData | Problem:
    """The policy file name's text loaded, or what is wrong with it as YAML."""
    try:
        return load(text)
    except YamlError as exc:
        return Problem(name, exc.line, "", str(exc))


def load(text: str) -> LocatedData:
    block = read_block(text, plain_scalar, all_strings, yamlcore.MAX_NODES, yamlcore.MAX_DEPTH)
    if block is not None:
        return LocatedData(*block)
    from hostwall import yamlnodes

    return LocatedData(*yamlnodes.load(text))
