"""yamlsource.load: the one-pass build for documents without aliases agrees with the
thorough path (expansion check, then build), and lines agree with a model of them.

The model is the rule that lines followed when every path was stored: the root's line,
a mapping value's is its key's line, a sequence item's is the item's own, and a path
that leads nowhere gets the line of its longest known prefix.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from reference import examples

from hostwall import yamlcore, yamlnodes, yamlsource
from hostwall.yamlsource import LocatedData, YamlError

Path = tuple[Any, ...]


def thorough(text: str) -> LocatedData:
    """What load does when a document has aliases: check the expansion, then build."""
    root = yamlnodes._compose(text)
    if root is None:
        return LocatedData({})
    yamlnodes._check_expansion(root, {}, set(), 0)
    return LocatedData(*yamlnodes._located(root, seen=None))


def model_lines(node: yaml.Node, path: Path = (), lines: dict[Path, int] | None = None) -> dict[Path, int]:
    lines = {path: node.start_mark.line + 1} if lines is None else lines
    if isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            lines[(*path, index)] = child.start_mark.line + 1
            model_lines(child, (*path, index), lines)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = yamlnodes._build(key_node, {}, [1], 0, None)
            lines[(*path, key)] = key_node.start_mark.line + 1
            model_lines(value_node, (*path, key), lines)
    return lines


def model_line_of(lines: dict[Path, int], path: Path) -> int | None:
    return next((lines[path[:end]] for end in range(len(path), -1, -1) if path[:end] in lines), None)


def paths(data: Any, prefix: Path = ()) -> Iterator[Path]:
    yield prefix
    yield from ((*prefix, "absent"), (*prefix, 10**6), (*prefix, -1))
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from paths(value, (*prefix, index))


def outcome(load: Any, text: str) -> tuple[Any, ...]:
    try:
        located = load(text)
    except YamlError as exc:
        return ("error", str(exc), exc.line)
    sample = list(itertools.islice(paths(located.data), 2000))
    # repr: NaN is not equal to itself, and {1: x} equals {True: x}.
    return ("ok", repr(located.data), [(path, located.line_of(path)) for path in sample])


def assert_agrees(text: str) -> None:
    fast = outcome(yamlsource.load, text)
    assert fast == outcome(thorough, text), text
    if fast[0] == "ok":
        root = yamlnodes._compose(text)
        lines = model_lines(root) if root is not None else {}
        assert fast[2] == [(path, model_line_of(lines, path)) for path, _ in fast[2]], text
        located = yamlsource.load(text)
        for path, _ in fast[2][:200]:
            assert located.item_lines(path, 3) == [located.line_of((*path, index)) for index in range(3)], path


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.text("ab: -#&*\n'\"", max_size=4),
    st.sampled_from(["2099-01-01", "1_000", "0x1f", "on", "~", "1.5", ".nan", "*x", "&y", "<<"]),
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.text("abc", max_size=2), st.integers(0, 3), st.booleans()), inner, max_size=3),
    max_leaves=12,
)


# An edit of a document's lines: (draw, lines, index of the line) -> None, in place.
LineEdit = Callable[[st.DrawFn, list[str], int], None]
SHARED_EDITS: dict[str, LineEdit] = {
    "repeat": lambda _, lines, index: lines.insert(index, lines[index]),
    "drop": lambda _, lines, index: lines.__delitem__(index),
}


def edited(draw: st.DrawFn, lines: list[str], edits: dict[str, LineEdit]) -> list[str]:
    """lines with up to two of the edits made, at lines drawn."""
    for _ in range(draw(st.integers(0, 2))):
        if not lines:
            break
        index = draw(st.integers(0, len(lines) - 1))
        edits[draw(st.sampled_from(sorted(edits)))](draw, lines, index)
    return lines


@st.composite
def documents(draw: st.DrawFn) -> str:
    """YAML text, often with anchors and aliases (safe_dump writes one for each subtree
    used twice), then edited line by line into duplicate keys, merge keys, aliases that
    are undefined or contain themselves, and syntax errors."""
    pieces = draw(st.lists(TREES, min_size=1, max_size=3))
    document: dict[str, Any] = {f"k{index}": piece for index, piece in enumerate(pieces)}
    document["again"] = [pieces[i] for i in draw(st.lists(st.integers(0, len(pieces) - 1), max_size=3))]
    text = yaml.safe_dump(document, default_flow_style=draw(st.sampled_from([False, None, True])), sort_keys=False)
    return "".join(edited(draw, text.splitlines(keepends=True), {
        **SHARED_EDITS,
        "indent": lambda _, lines, index: lines.__setitem__(index, "  " + lines[index]),
        "anchor": lambda _, lines, index: lines.__setitem__(index, lines[index].replace(": ", ": &z ", 1)),
        "alias": lambda _, lines, index: lines.insert(index + 1, "zz: *z\n"),
        "merge": lambda _, lines, index: lines.insert(index, "<<: *z\n"),
    }))


@examples(300)
@given(documents())
def test_the_one_pass_build_agrees_with_the_thorough_path(text: str) -> None:
    assert_agrees(text)


DEEP_ALIAS = "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 10 + "*a" + "]" * 10 + "\n"
CASES = {
    "empty": "",
    "scalar": "hello\n",
    "sequence": "- 1\n- [2, {a: b}]\n",
    "scalar aliases": "a: &x 1\nb: *x\nc: [*x, *x]\n",
    "collection alias": "a: &x {b: [1, 2]}\nc: *x\nd: [*x]\n",
    "self-containing alias": "a: &x [1, *x]\n",
    "alias deeper than its anchor": DEEP_ALIAS,
    "key that is a sequence": "? [a, b]\n: 1\n",
    "key that is a mapping after lists": "a: [1, 2]\nb: {c: 1}\n? {d: 1}\n: 2\n",
    "true and 1 as keys": "{1: a, true: b}\n",
    "tagged values": "a: !!str 1\nb: !!int '2'\nc: !!float 1e3\nd: !!null ''\n",
    "merge key": "x: &m {a: 1}\ny:\n  <<: *m\n",
    "duplicate key then deep nesting": "a: 1\na: 2\nb: " + "[" * 100 + "]" * 100 + "\n",
    "deep nesting": "a: " + "[" * 70 + "]" * 70 + "\n",
    "merge key without an alias": "y:\n  <<: {a: 1}\n",
    "quoted merge key": "y:\n  '<<': {a: 1}\n",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tricky_documents_agree(name: str) -> None:
    assert_agrees(CASES[name])


def test_the_expansion_check_still_comes_before_any_build_error() -> None:
    with pytest.raises(YamlError) as caught:
        yamlsource.load(CASES["duplicate key then deep nesting"])
    assert (str(caught.value), caught.value.line) == (f"nesting deeper than {yamlcore.MAX_DEPTH} levels", 3)


def test_an_alias_deeper_than_its_anchor_is_still_too_deep() -> None:
    with pytest.raises(YamlError, match="nesting deeper than"):
        yamlsource.load(DEEP_ALIAS)


def test_an_alias_bomb_is_refused_before_it_is_built() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    # Memory, not time: a machine's load cannot move it. Building up to the node limit
    # before refusing takes over 100 MB; refusing from the composed nodes, kilobytes.
    tracemalloc.start()
    try:
        with pytest.raises(YamlError, match="alias bomb") as caught:
            yamlsource.load(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"{peak} bytes allocated: the expansion was built before being refused"
    assert caught.value.line == 7  # g: the first anchor that expands past the limit


def test_a_document_without_aliases_over_the_node_limit_gets_the_expansion_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(yamlcore, "MAX_NODES", 10)
    with pytest.raises(YamlError, match="aliases expand the document to more than 10 nodes"):
        yamlsource.load("a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")


def tags(node: yaml.Node | None, seen: set[int] | None = None) -> Iterator[tuple[int, str]]:
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    yield node.start_mark.index, node.tag
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            yield from tags(child, seen)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            yield from tags(key_node, seen)
            yield from tags(value_node, seen)


@examples(200)
@given(documents())
def test_tags_resolved_once_per_plain_scalar_are_the_safe_loaders(text: str) -> None:
    try:
        expected = list(tags(yaml.compose(text, Loader=yamlnodes._SafeLoader)))
    except yaml.YAMLError:
        return
    assert list(tags(yaml.compose(text, Loader=yamlnodes._Loader))) == expected


@examples(300)
@given(st.lists(st.one_of(SCALARS.map(str), st.text("0123456789.:-+_eE xXoObBtTnNyY~", max_size=12)), max_size=6),
       st.booleans())
def test_a_plain_scalar_gets_the_same_tag_the_first_time_and_after(values: list[str], quoted: bool) -> None:
    loader, reference = yamlnodes._Loader(""), yamlnodes._SafeLoader("")
    for value in values + values:
        implicit = (not quoted, quoted)
        assert loader.resolve(yaml.ScalarNode, value, implicit) == reference.resolve(yaml.ScalarNode, value, implicit)


def test_a_document_without_aliases_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> int:
        raise AssertionError("the expansion check ran")

    monkeypatch.setattr(yamlnodes, "_check_expansion", refuse)
    located = yamlsource.load("services:\n  https:\n    allow:\n    - cidr: 192.0.2.1/32\n      owner: &o t\n"
                              "      reason: *o\n")
    assert located.data == {"services": {"https": {"allow": [{"cidr": "192.0.2.1/32", "owner": "t", "reason": "t"}]}}}
    assert located.line_of(("services", "https", "allow", 0, "reason")) == 6


@examples(300)
@given(documents())
def test_the_event_build_agrees_with_the_node_build_or_leaves_the_document_to_it(text: str) -> None:
    try:
        plain = LocatedData(*yamlnodes._load_plain(text))
    except Exception:  # noqa: BLE001 - not plain: load composes it (the tests above)
        return
    assert outcome(lambda _: plain, text) == outcome(thorough, text), text


POLICY = """services:
  https:
    allow:
      - cidr: 192.0.2.0/24
        owner: "ops"
        reason: 'partner'
        review_by: 2099-01-01
      - {cidr: 198.51.100.7/32, owner: ops, reason: x, review_by: 2099-01-01, broad_ok: true}
    ports: [443, 8443]
    log: ~
"""


@pytest.mark.parametrize("text", [POLICY, CASES["empty"], CASES["scalar"], CASES["sequence"], "---\n", "a: 1\n"])
def test_a_plain_document_is_built_from_its_events_alone(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = outcome(thorough, text)

    def refuse(*_: object) -> None:
        raise AssertionError("the node graph was composed")

    monkeypatch.setattr(yamlnodes, "_compose", refuse)
    assert outcome(yamlsource.load, text) == expected


@pytest.mark.parametrize("name", ["scalar aliases", "collection alias", "key that is a sequence", "true and 1 as keys",
                                  "tagged values", "merge key", "duplicate key then deep nesting", "deep nesting",
                                  "merge key without an alias"])
def test_documents_with_more_than_plain_data_are_composed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    composed = []
    compose = yamlnodes._compose

    def counted(text: str) -> yaml.Node | None:
        composed.append(text)
        return compose(text)

    monkeypatch.setattr(yamlnodes, "_compose", counted)
    assert_agrees(CASES[name])
    assert composed
