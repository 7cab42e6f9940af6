"""policyplain: a policy file it accepts gets exactly the FileSpec the models give it,
and the common policy file never needs the models at all.

Documents are drawn field by field from values on every edge the models judge: each
type next to the values the models coerce into it (1 for true, "443" for a number,
another spelling of a date or time), numbers at their bounds, empty strings and lists,
CIDRs the parser refuses, dates and times that do not exist or leave the years 1-9999
in UTC, and unknown or missing keys.
"""

from __future__ import annotations

import copy
from datetime import date
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall import policyfile, policyplain
from hostwall.policyplain import plain_file_spec
from hostwall.policyspec import FileSpec
from hostwall.yamlsource import LocatedData, load

ABSENT = object()
BOUNDED = settings(max_examples=200, deadline=None)

OTHER_TYPES = [None, True, False, 0, 1, -1, 1.0, 0.5, "", " ", "x", [], {}, ["x"], {"x": 1}]
TEXTS = ["ops", "partner B (OPS-1234)", "a", " ", "", "é", "x\ty", "0", "true"]
DATES = ["2099-01-01", "2030-02-28", "2028-02-29", "2027-02-29", "2099-02-30", "0000-01-01", "0001-01-01",
         "9999-12-31", "2099-1-1", "20990101", "2099-W01-1", " 2099-01-01", "2099-01-01T00:00:00",
         "2099-01-01T00:00:00Z", "2099-01-01 ", "1700000000",
         "\u0662\u0660\u0669\u0669-\u0660\u0661-\u0660\u0661"]  # in Arabic-Indic digits
MOMENTS = [
    "2027-01-01T00:00:00Z", "2027-01-01T00:00:00+00:00", "2027-01-01T00:00:00-00:00", "2027-06-30T12:30:45+05:30",
    "2027-06-30T12:30:45.5Z", "2027-06-30T12:30:45.123456-08:00", "2027-06-30T12:30:45.1234567Z",
    "2027-01-01T00:00:00+23:59", "2027-01-01T00:00:00+24:00", "2027-01-01T00:00:00", "2027-01-01 00:00:00Z",
    "2027-01-01t00:00:00z", "2027-01-01T24:00:00Z", "2027-01-01T23:59:60Z", "2027-02-30T00:00:00Z",
    "0001-01-01T00:00:00+01:00", "0001-01-01T01:00:00+01:00", "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59+01:00", "2027-01-01", "2027-01-01T00:00Z", "2027-01-01T00:00:00+0100", "1700000000"]
CIDRS = ["192.0.2.0/24", "203.0.113.45/32", "203.0.113.45", "2001:db8::/48", "2001:db8::1", "192.0.2.1/24",
         "0.0.0.0/0", "::/0", "::ffff:192.0.2.0/120", "010.0.0.0/8", " 192.0.2.0/24", "192.0.2.0/024",
         "10.0.0.0/33", "not an address", "2001:db8::/129"]
PORTS = [443, 5432, 1, 65535, 0, 65536, -1, True, "443", "8000-8100", "8100-8000", " 8000-8100 ", "8000-70000",
         "1-1", 443.0, None, [443]]
INTS = [-1, 0, 1, 10, 20, 24, 32, 33, 48, 100, 128, 129, 65535, 65536, 100000, 100001]
# The edges of each field, by its key (a port or protocol is an item of its key's list).
FIELD_EDGES: dict[str, list[Any]] = {
    "owner": TEXTS, "reason": TEXTS, "broad_reason": TEXTS, "owners": TEXTS, "file": TEXTS,
    "review_by": DATES + MOMENTS, "expires": MOMENTS + DATES, "cidr": CIDRS, "ports": PORTS,
    "protocols": ["tcp", "udp", "TCP", "icmp", ""], "action": ["drop", "reject", "accept", "Drop", "off"],
    "log": [*INTS, "off", "on", "Off", False, True], "broad_ok": [True, False],
    "entry_counters": [True, False], "strict_source": [True, False],
    **dict.fromkeys(["log_group", "log_rate", "log_burst", "ipv4", "ipv6"], INTS),
}
EDGES = st.one_of(st.sampled_from(OTHER_TYPES + TEXTS + DATES + MOMENTS + CIDRS + PORTS + INTS),
                  st.lists(st.sampled_from(PORTS + TEXTS), max_size=2),
                  st.sampled_from(["drop", "reject", "accept", "tcp", "udp", "TCP", "off", "on", "partners.txt"]))
KNOWN_KEYS = sorted({*policyplain.FILE_KEYS, *policyplain.SERVICE_KEYS, *policyplain.ALLOW_KEYS,
                     *policyplain.SETTINGS_KEYS, *policyplain.WIDEST_KEYS, "comment", "https"})


def field_of(path: tuple[Any, ...]) -> str:
    return next((part for part in reversed(path) if isinstance(part, str)), "")


def places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The path of every value in the document, and of every mapping (to add a key to)."""
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += places(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += places(value, (*path, index))
    return found


def mutated(data: dict[str, Any], draw: st.DrawFn) -> dict[str, Any]:
    """A copy of data with one value replaced by an edge value, one key removed, or one key
    added to a mapping."""
    data = copy.deepcopy(data)
    path = draw(st.sampled_from(places(data)))
    node: Any = data
    for part in path:
        parent, node = node, node[part]
    how = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
    if how == "add" and isinstance(node, dict):
        key = draw(st.sampled_from(KNOWN_KEYS))
        node[key] = draw(st.sampled_from(FIELD_EDGES[key]) if key in FIELD_EDGES and draw(st.booleans()) else EDGES)
    elif how == "remove" and path and isinstance(parent, dict):
        del parent[path[-1]]
    elif path:
        edges = FIELD_EDGES.get(field_of(path))
        parent[path[-1]] = draw(EDGES if edges is None or draw(st.integers(0, 3)) == 0 else st.sampled_from(edges))
    return data


def located(data: Any, through_yaml: bool) -> LocatedData:
    """The document as YAML gives it (types, lines), or as drawn (no lines)."""
    return load(yaml.safe_dump(data, sort_keys=False)) if through_yaml else LocatedData(data)


def assert_as_the_models_decide(document: LocatedData) -> FileSpec | None:
    plain = plain_file_spec(document)
    models = policyfile.validate_document("p.yaml", document)
    if plain is not None:
        assert isinstance(models, FileSpec), models
        assert plain == models
        assert plain.to_json() == models.to_json()  # expiry offsets and times, as the cache keeps them
    return plain


VALID_ENTRIES = st.builds(
    lambda source, owner, reason, review_by, expires, broad: {
        **source, "owner": owner, "reason": reason, "review_by": review_by,
        **({} if expires is None else {"expires": expires}),
        **({"broad_ok": True, "broad_reason": "a partner's whole range"} if broad else {})},
    st.one_of(st.builds(lambda cidr: {"cidr": cidr}, st.sampled_from(["192.0.2.0/24", "2001:db8::/48",
                                                                      "203.0.113.45"])),
              st.just({"file": "partners.txt"})),
    st.sampled_from(["ops", "é"]), st.sampled_from(["office VPN", " "]),
    st.sampled_from(["2099-01-01", "2028-02-29"]),
    st.sampled_from([None, "2027-01-01T00:00:00Z", "2027-06-30T12:30:45.5+05:30", "9999-12-31T23:59:59+01:00"]),
    st.booleans())
VALID_SERVICES = st.fixed_dictionaries({"allow": st.lists(VALID_ENTRIES, min_size=1, max_size=4)}, optional={
    "ports": st.lists(st.sampled_from([443, "8000-8100", 65535]), min_size=1, max_size=2),
    "protocols": st.sampled_from([["tcp"], ["udp", "tcp"]]), "action": st.sampled_from(["drop", "reject"]),
    "widest": st.fixed_dictionaries({}, optional={"ipv4": st.sampled_from([0, 32]), "ipv6": st.sampled_from([0, 128])}),
    "entry_counters": st.booleans(), "log": st.sampled_from(["off", False, 1, 100000, None]),
})
VALID_DOCUMENTS = st.fixed_dictionaries({
    "services": st.dictionaries(st.sampled_from(["https", "postgres"]),
                                st.one_of(VALID_SERVICES, VALID_SERVICES, VALID_SERVICES, st.none()),
                                min_size=1, max_size=2)}, optional={
    "settings": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "log_group": st.sampled_from([0, 65535]), "log_rate": st.sampled_from([1, 100000]),
        "strict_source": st.booleans(), "owners": st.lists(st.sampled_from(["ops", "dba"]), max_size=2)})),
})


@BOUNDED
@given(VALID_DOCUMENTS, st.booleans())
def test_a_plainly_valid_file_needs_no_models(data: dict[str, Any], through_yaml: bool) -> None:
    assert assert_as_the_models_decide(located(data, through_yaml)) is not None


@settings(max_examples=500, deadline=None)
@given(VALID_DOCUMENTS, st.integers(1, 2), st.booleans(), st.data())
def test_a_file_it_accepts_gets_the_models_spec(data: dict[str, Any], edits: int, through_yaml: bool,
                                                draw: st.DataObject) -> None:
    for _ in range(edits):
        data = mutated(data, draw.draw)
    assert_as_the_models_decide(located(data, through_yaml))


# Every field present, every kind of entry.
CANONICAL = {
    "settings": {"log_group": 100, "log_rate": 10, "log_burst": 20, "strict_source": False, "owners": ["ops"]},
    "services": {
        "https": {"ports": [443, "8000-8100"], "protocols": ["tcp"], "action": "drop",
                  "widest": {"ipv4": 24, "ipv6": 48}, "entry_counters": True, "log": 5, "allow": [
                      {"cidr": "192.0.2.0/24", "owner": "ops", "reason": "office", "review_by": "2099-01-01",
                       "expires": "2099-01-01T00:00:00Z", "broad_ok": True, "broad_reason": "whole office"},
                      {"file": "partners.txt", "owner": "ops", "reason": "partners", "review_by": "2099-01-01"}]},
        "postgres": None,
    },
}


def single_edits() -> list[dict[str, Any]]:
    """CANONICAL with each value replaced by each edge of its field and each other type,
    each key removed, and each known key added to each mapping with each of its edges."""
    edited = []
    for path in places(CANONICAL)[1:]:
        for value in FIELD_EDGES.get(field_of(path), []) + OTHER_TYPES:
            document = copy.deepcopy(CANONICAL)
            dict_at(document, path[:-1])[path[-1]] = copy.deepcopy(value)
            edited.append(document)
        document = copy.deepcopy(CANONICAL)
        parent = dict_at(document, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
            edited.append(document)
    for path in [p for p in places(CANONICAL) if isinstance(dict_at(CANONICAL, p), dict)]:
        for key in KNOWN_KEYS:
            for value in FIELD_EDGES.get(key, ["x"]):
                document = copy.deepcopy(CANONICAL)
                dict_at(document, path)[key] = value
                edited.append(document)
    return edited


def dict_at(document: Any, path: tuple[Any, ...]) -> Any:
    """The node at path."""
    for part in path:
        document = document[part]
    return document


def test_every_single_edit_of_a_full_file_is_decided_as_the_models_decide() -> None:
    edits = single_edits()
    assert assert_as_the_models_decide(LocatedData(CANONICAL)) is not None
    decided = [assert_as_the_models_decide(LocatedData(document)) is not None for document in edits]
    # Hundreds of edits decided here, against the models, and the rest left to them.
    assert 300 < sum(decided) < len(edits) - 300, (sum(decided), len(edits))


def test_the_keys_and_defaults_are_the_models() -> None:
    assert set(policyfile.PolicyFileModel.model_fields) == policyplain.FILE_KEYS
    assert set(policyfile.ServiceModel.model_fields) == policyplain.SERVICE_KEYS
    assert set(policyfile.AllowEntryModel.model_fields) == policyplain.ALLOW_KEYS
    assert set(policyfile.SettingsModel.model_fields) == policyplain.SETTINGS_KEYS
    assert set(policyfile.WidestModel.model_fields) == policyplain.WIDEST_KEYS
    spec = plain_file_spec(LocatedData({"settings": {}, "services": {"https": {"widest": {}}}}))
    assert spec is not None
    assert spec.settings == policyfile.SettingsModel().model_dump()
    assert spec.services[0].widest == (policyfile.WidestModel().ipv4, policyfile.WidestModel().ipv6)


@pytest.mark.parametrize(("where", "low", "high"), [
    (("settings", "log_group"), 0, 65535), (("settings", "log_rate"), 1, 100000),
    (("settings", "log_burst"), 1, 100000), (("services", "https", "log"), 1, 100000),
    (("services", "https", "widest", "ipv4"), 0, 32), (("services", "https", "widest", "ipv6"), 0, 128),
])
def test_both_paths_hold_each_number_to_its_range(where: tuple[str, ...], low: int, high: int) -> None:
    """The bounds both paths share (policyspec), at their edges and one past them."""
    for value, valid in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        document = copy.deepcopy(CANONICAL)
        dict_at(document, where[:-1])[where[-1]] = value
        spec = assert_as_the_models_decide(LocatedData(document))
        assert (spec is not None) == valid, (where, value)
        assert isinstance(policyfile.validate_document("p.yaml", LocatedData(document)), FileSpec) == valid


def test_lines_are_the_models_lines() -> None:
    text = ("settings:\n  log_rate: 5\nservices:\n  https:\n    ports: [443]\n    allow:\n"
            "      - cidr: 192.0.2.0/24\n        owner: ops\n        reason: office\n        review_by: 2099-01-01\n"
            "\n      - file: partners.txt\n        owner: ops\n        reason: partners\n"
            "        review_by: 2099-01-01\n")
    spec = assert_as_the_models_decide(load(text))
    assert spec is not None
    assert (spec.settings_line, spec.services[0].line) == (1, 4)
    assert [entry.line for entry in spec.services[0].allow] == [7, 12]
    assert spec.services[0].allow[0].review_by == date(2099, 1, 1)


def test_what_it_leaves_the_models_still_word() -> None:
    document = load("services:\n  https:\n    allow:\n      - cidr: 192.0.2.1/24\n        owner: ops\n"
                    "        reason: office\n        review_by: 2099-01-01\n")
    assert plain_file_spec(document) is None
    problems = policyfile.validate_document("p.yaml", document)
    assert isinstance(problems, list) and len(problems) == 1
    assert problems[0].line == 4 and "192.0.2.1/24" in problems[0].message
