"""yamlblock.read_block: a block document is read with the very data, values and lines
that libyaml gives it (the thorough path of test_yamlsource), or left to libyaml.

Documents are drawn in the shapes tools and people write (indentation of 2 to 4,
sequences under or beside their key, comments, blank lines, trailing spaces) from
scalars and keys that sit on every edge of what a plain scalar is, then edited line by
line into errors and near misses.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from reference import examples
from test_yamlsource import SHARED_EDITS, LineEdit, documents, edited, outcome, thorough

from hostwall import yamlblock, yamlcore, yamlnodes, yamlsource
from hostwall.yamlblock import read_block
from hostwall.yamlsource import LocatedData


def block(text: str) -> LocatedData | None:
    read = read_block(text, yamlcore.plain_scalar, yamlcore.all_strings, yamlcore.MAX_NODES, yamlcore.MAX_DEPTH)
    return None if read is None else LocatedData(*read)


def assert_read_as_libyaml_reads_it_or_left(text: str) -> bool:
    """True when the block reader read it (and agreed)."""
    located = block(text)
    if located is None:
        return False
    assert outcome(lambda _: located, text) == outcome(thorough, text), text
    return True


# Plain scalars and near misses: tags (bool, null, int, float, timestamp, merge, value),
# indicators first and inside, ": " and " #", flow characters, quotes, non-ASCII, runs
# of spaces, and a colon at the end.
EDGY_VALUES = [
    "192.0.2.0/24", "2001:db8::/48", "2001:db8::", "::1", "2099-01-01", "2030-01-01T00:00:00Z", "12:30", "1_000",
    "0x1f", "0o17", "017", "1e3", "1.5", ".5", ".inf", "-.inf", ".nan", "+1", "-1", "on", "Off", "yes", "NO",
    "true", "null", "Null", "~", "=", "<<", "a: b", "a:b", "a:", ":a", "a #b", "a#b", "a,b", "a, b", "it's",
    'say "hi"', "(ticket OPS-1", "x)", "a  b", "a b c", "a\tb", "é", "[x]", "x]", "{x}", "&a", "*a", "!t", "?x",
    "%x", "@x", "`x", "|", ">", "-", "- x", "--- x", "...", "a - b", "a ? b", "a & b", "a | b", "ops@example.org",
    "#x", "0", "00", "1:2:3", "1_2:3", "0b101", "2099-1-1", "2099-01-01 10:00:00",
]
EDGY_KEYS = ["cidr", "owner", "review_by", "x-y", "_a", "A", "on", "yes", "null", "true", "y", "n", "a b",
             "a:b", "1", "-x", "<<", "é", "a#"]
SAFE_VALUES = st.sampled_from(["192.0.2.0/24", "2001:db8::/48", "2099-01-01", "2030-01-01T00:00:00Z", "ops",
                               "office VPN exit", "partner (ticket OPS-1234)", "it's", "a,b", "443", "true", "~",
                               "1.5", "ops@example.org", "x:y"])
SAFE_KEYS = st.sampled_from(["cidr", "owner", "allow", "x-y", "_k"])
# Sequences hold scalars and mappings (a sequence right inside a sequence is left to libyaml).
SAFE_TREES = st.recursive(
    SAFE_VALUES,
    lambda inner: st.dictionaries(SAFE_KEYS, inner, min_size=1, max_size=3)
    | st.lists(SAFE_VALUES | st.dictionaries(SAFE_KEYS, inner, min_size=1, max_size=3), min_size=1, max_size=3),
    max_leaves=10)
# Mostly what the reader is for, so that it reads a good share of the documents drawn
# (and the edits below spoil some), with every edge in among them.
TREES = st.recursive(
    st.one_of(SAFE_VALUES, SAFE_VALUES, SAFE_VALUES, st.sampled_from(EDGY_VALUES),
              st.text("ab1.:/ #-,'", min_size=1, max_size=6)),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(SAFE_KEYS, SAFE_KEYS, st.sampled_from(EDGY_KEYS),
                                st.text("abk_-", min_size=1, max_size=3)), inner, max_size=3),
    max_leaves=14,
)


def render(tree: Any, draw: st.DrawFn, column: int = 0, flow: Callable[[str], bool] = lambda _: True) -> list[str]:
    """tree as block YAML lines written by hand: every scalar plain, as it is; a sequence
    of scalars that flow() allows is sometimes written on one line, in brackets."""
    step = draw(st.sampled_from([2, 2, 4, 3]))
    lines: list[str] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            comment = draw(st.sampled_from(["", "", "", "  # note", " #x"]))
            if (isinstance(value, list) and all(isinstance(item, str) and flow(item) for item in value)
                    and draw(st.booleans())):
                comma = draw(st.sampled_from([", ", ",", " , "]))
                lines.append(f"{' ' * column}{key}: [{comma.join(value)}]{comment}")
            elif isinstance(value, dict | list) and value:
                lines.append(f"{' ' * column}{key}:{comment}")
                beside = isinstance(value, list) and draw(st.booleans())
                lines += render(value, draw, column if beside else column + step, flow)
            else:
                text = value if isinstance(value, str) else ""
                lines.append(f"{' ' * column}{key}: {text}{comment}".rstrip(" ") + draw(st.sampled_from(["", "", " "])))
    elif isinstance(tree, list):
        for item in tree:
            dash = draw(st.sampled_from(["- ", "- ", "-   "]))
            if isinstance(item, dict) and item:
                inner = render(item, draw, column + len(dash), flow)
                while inner[0].strip(" ")[:1] in ("", "#"):  # a blank or comment line goes before the item
                    lines.append(inner.pop(0))
                lines.append(f"{' ' * column}{dash}{inner[0].lstrip(' ')}")
                lines += inner[1:]
            elif isinstance(item, list) and item:
                lines.append(f"{' ' * column}-")
                lines += render(item, draw, column + step, flow)
            else:
                lines.append(f"{' ' * column}{dash}{item if isinstance(item, str) else ''}")
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "# comment", "   ", "  # x"])))
    return lines


@st.composite
def block_documents(draw: st.DrawFn) -> str:
    tree = draw(st.dictionaries(st.sampled_from(EDGY_KEYS[:4]) | st.text("abk", min_size=1, max_size=3), TREES,
                                min_size=1, max_size=3))
    lines = edited(draw, render(tree, draw), EDITS)
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


def _insert_character(draw: st.DrawFn, lines: list[str], index: int) -> None:
    at = draw(st.integers(0, len(lines[index])))
    inserted = draw(st.sampled_from([":", "#", " ", "'", '"', "[", "&", "*", "é", "- ", ": ", " #", "?"]))
    lines[index] = lines[index][:at] + inserted + lines[index][at:]


EDITS: dict[str, LineEdit] = {
    **SHARED_EDITS,
    "indent": lambda _, lines, index: lines.__setitem__(index, " " + lines[index]),
    "outdent": lambda _, lines, index: lines.__setitem__(index, lines[index][1:]),
    "insert": _insert_character,
    "tab": lambda _, lines, index: lines.__setitem__(index, "\t" + lines[index]),
    "crlf": lambda _, lines, index: lines.__setitem__(index, lines[index] + "\r"),
    "marker": lambda draw, lines, index: lines.insert(index, draw(st.sampled_from(["---", "...", "%YAML 1.1",
                                                                                  "? a"]))),
}


@examples(500)
@given(block_documents())
def test_a_block_document_is_read_as_libyaml_reads_it_or_left_to_it(text: str) -> None:
    assert_read_as_libyaml_reads_it_or_left(text)


@examples(200)
@given(documents())
def test_documents_yaml_writes_are_read_as_libyaml_reads_them_or_left_to_it(text: str) -> None:
    assert_read_as_libyaml_reads_it_or_left(text)




@examples(200)
@given(st.data())
def test_the_shapes_it_is_for_are_read_without_libyaml(data: st.DataObject) -> None:
    tree = data.draw(st.dictionaries(st.sampled_from(["services", "settings", "k"]), SAFE_TREES, min_size=1))
    lines = render(tree, data.draw, flow=re.compile(r"[A-Za-z0-9_./+~][A-Za-z0-9_./+~-]*").fullmatch)
    text = "\n".join(lines) + "\n"
    assert assert_read_as_libyaml_reads_it_or_left(text), text


_KEY_AT_START = re.compile(r"^( *(?:- +)?)[A-Za-z_][A-Za-z0-9_-]*:")


@st.composite
def nearly_plain_documents(draw: st.DrawFn) -> str:
    """A document of the shape the reader is for, with one edge in it: a value or a key
    from the edges of plain scalars, or one of the line edits."""
    tree = draw(st.dictionaries(st.sampled_from(["services", "settings", "k"]), SAFE_TREES, min_size=1))
    lines = render(tree, draw, flow=re.compile(r"[A-Za-z0-9_./+~][A-Za-z0-9_./+~-]*").fullmatch)
    index = draw(st.integers(0, len(lines) - 1))
    line, change = lines[index], draw(st.sampled_from(["value", "key", "edit"]))
    if change == "value" and ": " in line:
        lines[index] = line[:line.index(": ") + 2] + draw(st.sampled_from(EDGY_VALUES))
    elif change == "key" and _KEY_AT_START.match(line):
        lines[index] = _KEY_AT_START.sub(lambda m: f"{m[1]}{draw(st.sampled_from(EDGY_KEYS))}:", line, count=1)
    else:
        EDITS[draw(st.sampled_from(sorted(EDITS)))](draw, lines, index)
    return "\n".join(lines) + "\n"


@examples(300)
@given(nearly_plain_documents())
def test_a_document_with_one_edge_is_read_as_libyaml_reads_it_or_left_to_it(text: str) -> None:
    assert_read_as_libyaml_reads_it_or_left(text)


RUN_KEYS = ["cidr", "owner", "reason", "review_by", "expires", "x-y", "_k"]


@st.composite
def run_documents(draw: st.DrawFn) -> str:
    """An inline allowlist as tools write it: a sequence of mappings of one shape (the same
    keys in the same order), with now and then an item of another shape, a comment or
    blank line between items, and another key or service after it."""
    keys = draw(st.lists(st.sampled_from(RUN_KEYS), min_size=1, max_size=4, unique=True))
    column = draw(st.sampled_from([6, 8, 2]))
    beside = draw(st.integers(0, 4)) == 0  # the sequence at its key's column
    items = column - 2 if beside else column
    lines = [f"{' ' * (column - 2)}allow:"] if column == 2 else ["services:", "  https:", f"{' ' * (column - 2)}allow:"]
    for _ in range(draw(st.integers(2, 9))):
        shape = list(keys)
        odd = draw(st.integers(0, 11))
        if odd == 0:
            shape.append(draw(st.sampled_from(["broad_ok", "a", "owner"])))  # one more key, or a repeated one
        elif odd == 1 and len(shape) > 1:
            shape.pop()
        elif odd == 2:
            lines.append(draw(st.sampled_from(["", "# a comment", f"{' ' * items}# a comment"])))
        for index, key in enumerate(shape):
            value = draw(SAFE_VALUES if draw(st.integers(0, 15)) else st.sampled_from(EDGY_VALUES))
            lead = "- " if index == 0 else "  "
            lines.append(f"{' ' * items}{lead}{key}: {value}")
    lines += draw(st.sampled_from([[], ["  postgres:", "    ports: [5432]"], [f"{' ' * (column - 2)}log: off"],
                                   ["settings:", "  log_rate: 10"]]))
    lines = edited(draw, lines, EDITS) if draw(st.integers(0, 3)) == 0 else lines
    return "\n".join(lines) + draw(st.sampled_from(["\n", "\n", ""]))


def line_path_only(text: str) -> LocatedData | None:
    saved = yamlblock._SHAPES_A_DOCUMENT
    yamlblock._SHAPES_A_DOCUMENT = 0
    try:
        return block(text)
    finally:
        yamlblock._SHAPES_A_DOCUMENT = saved


@examples(400)
@given(run_documents())
def test_runs_of_items_of_one_shape_are_read_as_libyaml_and_the_line_path_read_them(text: str) -> None:
    located = block(text)
    by_lines = line_path_only(text)
    assert (located is None) == (by_lines is None), text
    if located is not None and by_lines is not None:
        assert outcome(lambda _: located, text) == outcome(lambda _: by_lines, text), text
    assert_read_as_libyaml_reads_it_or_left(text)


def test_a_long_inline_allowlist_is_read_a_run_at_a_time() -> None:
    items = "".join(f"      - cidr: 192.0.2.{i}/32\n        owner: ops\n        reason: r {i}\n" for i in range(50))
    text = f"services:\n  https:\n    allow:\n{items}      - cidr: 198.51.100.0/24\n        owner: x\n" \
           f"        reason: r\n        expires: 2030-01-01T00:00:00Z\n  postgres:\n    allow:\n{items}"
    shapes = [shape for *_, shape in yamlblock._pieces(text) if shape is not None]
    # Each sequence's first item goes the line path; the item with a fourth key ends the
    # first run and is read as the line path reads it.
    assert [shape.keys for shape in shapes] == [("cidr", "owner", "reason")] * 2
    located = block(text)
    assert located is not None
    assert outcome(lambda _: located, text) == outcome(thorough, text)
    https = located.data["services"]["https"]["allow"]
    assert len(https) == 51 and https[50]["expires"] == "2030-01-01T00:00:00Z"
    assert located.line_of(("services", "https", "allow", 50, "expires")) == 3 + 150 + 4
    assert located.line_of(("services", "postgres", "allow", 49, "reason")) == 3 + 150 + 4 + 2 + 150


def test_past_its_shapes_a_document_is_read_line_by_line(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "a:\n" + "".join(f"  - k{n}: {i}\n    v: x\n" for n in range(4) for i in range(3))
    monkeypatch.setattr(yamlblock, "_SHAPES_A_DOCUMENT", 2)
    assert len([shape for *_, shape in yamlblock._pieces(text) if shape is not None]) == 2
    located = block(text)
    assert located is not None
    assert outcome(lambda _: located, text) == outcome(thorough, text)


DECLINED = {
    "mapping value inside a value": "a: b: c\n",
    "comment without a space before it": "a: b#c\n",
    "colon at the end of a value": "a: 2001:db8::\n",
    "key that is a boolean": "on: 1\n",
    "key that is null": "null: 1\n",
    "empty value": "a:\nb: 1\n",
    "empty value at the end": "a: 1\nb:\n",
    "tab": "a:\n\tb: 1\n",
    "carriage return": "a: 1\r\nb: 2\r\n",
    "quoted value": "a: 'b'\n",
    "anchor and alias": "a: &x 1\nb: *x\n",
    "tag": "a: !!str 1\n",
    "document marker": "---\na: 1\n",
    "second document": "a: 1\n---\nb: 2\n",
    "repeated key": "a: 1\na: 2\n",
    "continued scalar": "a: b\n  c\n",
    "line deeper than a scalar allows": "a: b\n  c: d\n",
    "line between two columns": "a:\n    b: 1\n  c: 2\n",
    "sequence at the root": "- a\n- b\n",
    "scalar at the root": "a\n",
    "sequence in a sequence": "a:\n  - - b\n",
    "empty item": "a:\n  -\n    b: 1\n",
    "key among items": "a:\n  - b\n  c: 1\n",
    "non-ASCII": "a: é\n",
    "flow sequence with a trailing comma": "a: [b, ]\n",
    "flow sequence of a scalar with a space": "a: [b c]\n",
    "flow sequence in a flow sequence": "a: [[b]]\n",
    "flow sequence and more": "a: [b]c\n",
    "flow sequence with an empty item": "a: [b,,c]\n",
    "flow sequence with a colon": "a: [b:c]\n",
    "flow sequence as an item": "a:\n  - [b]\n",
    "flow mapping": "a: {b: c}\n",
    "two spaces inside a value": "a: b  c\n",
    "byte order mark": "\ufeffa: 1\n",
    "only comments": "# nothing\n",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_what_is_not_a_plain_block_document_is_left_to_libyaml(name: str) -> None:
    assert block(DECLINED[name]) is None
    # and libyaml reads it as before: the result or the error of the other paths
    assert outcome(yamlsource.load, DECLINED[name]) == outcome(thorough, DECLINED[name])


def test_one_line_flow_sequences_of_plain_scalars_are_read() -> None:
    text = "ports: [443, 8443]\nprotocols: [ tcp ]\nnone: []   # empty\nranges: [8000-8100,9000]\n"
    located = block(text)
    assert located is not None
    assert located.data == {"ports": [443, 8443], "protocols": ["tcp"], "none": [], "ranges": ["8000-8100", 9000]}
    assert outcome(lambda _: located, text) == outcome(thorough, text)


def test_a_sequence_beside_its_key_ends_at_the_next_key() -> None:
    text = "a:\n- x\n- k: 1\n  l: 2\nb: 3\nc:\n  - y\n"
    located = block(text)
    assert located is not None
    assert located.data == {"a": ["x", {"k": 1, "l": 2}], "b": 3, "c": ["y"]}
    assert [located.line_of(p) for p in (("a", 0), ("a", 1, "l"), ("b",), ("c", 0))] == [2, 4, 5, 7]
    assert outcome(lambda _: located, text) == outcome(thorough, text)


POLICY = """# generated
services:
  metrics:
    ports: [9100]
    protocols: [tcp]
    allow:
      - cidr: 10.0.9.5/32
        owner: observability
        reason: prometheus scraper
        review_by: 2027-06-30
  https:
    allow:
      - cidr: 192.0.2.0/24
        owner: ops
        reason: partner (ticket OPS-1234)   # renewed
        review_by: 2099-01-01

      - cidr: 2001:db8::/48
        owner: it-network
        reason: office VPN exit
        review_by: 2099-01-01
        expires: 2030-01-01T00:00:00Z
settings:
  log_rate: 10
"""


def test_a_policy_in_the_block_shape_is_read_without_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = outcome(thorough, POLICY)

    def refuse(*_: object) -> None:
        raise AssertionError("libyaml was asked")

    monkeypatch.setattr(yamlnodes, "_load_plain", refuse)
    monkeypatch.setattr(yamlnodes, "_compose", refuse)
    assert outcome(yamlsource.load, POLICY) == expected
    assert expected[0] == "ok"


@examples(300)
@given(st.lists(st.sampled_from(EDGY_VALUES + EDGY_KEYS) | st.text("0123456789.:-+_eExXoObBtTnNyYlL~=<>!&* /",
                                                                    max_size=14), max_size=6))
def test_a_column_is_all_strings_only_if_each_of_its_scalars_is_its_own_text(texts: list[str]) -> None:
    value = yamlcore.plain_scalar
    assert yamlcore.all_strings(texts) == all(type(value(text)) is str and value(text) == text for text in texts)


def test_the_taggable_characters_are_every_character_an_implicit_tag_can_match() -> None:
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser

    def characters(items: Any) -> set[str]:
        found: set[str] = set()
        for op, argument in items:
            if op is sre.LITERAL:
                found.add(chr(argument))
            elif op is sre.IN:
                assert all(kind in (sre.LITERAL, sre.RANGE) for kind, _ in argument), argument  # no negation
                for kind, value in argument:
                    found.update(chr(value) if kind is sre.LITERAL else map(chr, range(value[0], value[1] + 1)))
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                found |= characters(argument[2])
            elif op is sre.SUBPATTERN:
                found |= characters(argument[3])
            elif op is sre.BRANCH:
                found = found.union(*(characters(branch) for branch in argument[1]))
            else:
                assert op is sre.AT, (op, argument)  # nothing that matches any character
        return found

    expressions = [e for resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values() for _, e in resolvers]
    assert expressions
    matched = set().union(*(characters(_parser.parse(e.pattern, e.flags)) for e in expressions))
    assert matched == set(yamlcore.TAGGABLE_CHARACTERS)


@examples(300)
@given(block_documents(), st.integers(1, 40))
def test_a_document_taken_apart_a_slice_at_a_time_reads_as_one_taken_whole(text: str, characters: int) -> None:
    whole = block(text)
    saved = yamlblock._SLICE_CHARACTERS
    yamlblock._SLICE_CHARACTERS = characters
    try:
        sliced = block(text)
    finally:
        yamlblock._SLICE_CHARACTERS = saved
    assert (whole is None) == (sliced is None), text
    if whole is not None and sliced is not None:
        assert outcome(lambda _: sliced, text) == outcome(lambda _: whole, text), text


@pytest.mark.parametrize(("limit", "value", "text"), [
    ("MAX_NODES", 12, "".join(f"k{i}: {i}\n" for i in range(6))),
    ("MAX_NODES", 12, "a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n"),
    ("MAX_NODES", 12, "a:\n" + "".join(f"  - k: {i}\n" for i in range(6))),
    ("MAX_DEPTH", 2, "a:\n  b:\n    c:\n      d: 1\n"),
    ("MAX_DEPTH", 2, "a:\n  - b:\n      - c: 1\n"),
    ("MAX_DEPTH", 2, "a:\n  b: [1]\n"),
    ("MAX_DEPTH", 2, "a:\n  - k: 1\n"),
])
def test_a_document_past_the_limits_is_left_to_libyaml(limit: str, value: int, text: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    expected = outcome(thorough, text)
    monkeypatch.setattr(yamlcore, limit, value)
    assert block(text) is None
    assert outcome(yamlsource.load, text) == outcome(thorough, text) != expected
