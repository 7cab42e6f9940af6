"""Policy loading and validation: every error names file, line and entry, and the fix."""

from __future__ import annotations

import gc
import ipaddress
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from hostwall.errors import PolicyError, Problem
from hostwall.policy import load_policy
from hostwall.policyspec import PortRange

WriteFiles = Callable[[dict[str, str | bytes]], Path]

NOW = datetime(2026, 6, 1, tzinfo=UTC)
META = "        owner: platform\n        reason: app servers\n        review_by: 2027-06-30\n"


def one_cidr(cidr: str, service: str = "https") -> str:
    """A policy whose only allow entry is on line 4."""
    return f"services:\n  {service}:\n    allow:\n      - cidr: '{cidr}'\n{META}"


def problems(path: Path) -> list[Problem]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path, now=NOW)
    return caught.value.problems


def only_problem(path: Path) -> Problem:
    found = problems(path)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def assert_located(problem: Problem, file: Path, line: int, entry: str) -> None:
    """The rendered problem starts with FILE:LINE: ENTRY, exactly as an operator sees it."""
    assert problem.file == str(file)
    assert problem.line == line
    assert str(problem).startswith(f"{file}:{line}: {entry}"), str(problem)


# --- a valid policy ---------------------------------------------------------------


def test_valid_policy_loads_entries_with_their_metadata_and_origin(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        "services:\n"
        "  https:\n"
        "    allow:\n"
        "      - cidr: 203.0.113.45/32\n"
        "        owner: partner-b\n"
        "        reason: inventory sync\n"
        "        review_by: 2027-03-01\n"
        "        expires: 2027-01-01T00:00:00Z\n"
        "      - cidr: 2001:db8:10::/48\n" + META
    )})
    policy = load_policy(root / "p.yaml", now=NOW)

    https = policy.service("https")
    assert https is not None
    first, second = https.entries
    assert first.network == ipaddress.ip_network("203.0.113.45/32")
    assert (first.owner, first.reason, first.review_by) == ("partner-b", "inventory sync",
                                                            date(2027, 3, 1))
    assert first.expires == datetime(2027, 1, 1, tzinfo=UTC)
    assert (first.origin.file, first.origin.line) == (str(root / "p.yaml"), 4)
    assert first.origin.entry == "services.https.allow[0]"
    assert second.network == ipaddress.ip_network("2001:db8:10::/48")
    assert second.origin.line == 9
    assert policy.files == (root / "p.yaml",)
    assert policy.warnings() == []


def test_builtin_services_are_always_present_with_their_ports(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services: {}\n"})
    policy = load_policy(root, now=NOW)

    https, postgres = policy.service("https"), policy.service("postgres")
    assert https is not None and postgres is not None
    assert (https.ports, https.protocols, https.action) == ((PortRange(443, 443),), ("tcp", "udp"), "drop")
    assert (postgres.ports, postgres.protocols) == ((PortRange(5432, 5432),), ("tcp",))
    assert https.entries == () and postgres.entries == ()
    assert [s.name for s in policy.services] == ["https", "postgres"]


def test_empty_file_still_protects_the_builtins(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": ""})
    assert [s.name for s in load_policy(root, now=NOW).services] == ["https", "postgres"]


def test_custom_service_ports_protocols_action_and_defaults(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        "services:\n"
        "  metrics:\n"
        "    ports: [9100, '9200-9299', 9100]\n"
        "    protocols: [udp, tcp, udp]\n"
        "    action: reject\n"
        "  dns:\n"
        "    ports: [53]\n"
    )})
    policy = load_policy(root, now=NOW)

    metrics, dns = policy.service("metrics"), policy.service("dns")
    assert metrics is not None and dns is not None
    assert metrics.ports == (PortRange(9100, 9100), PortRange(9200, 9299))
    assert metrics.protocols == ("tcp", "udp")
    assert metrics.action == "reject"
    assert (dns.protocols, dns.action) == (("tcp",), "drop")


def test_settings_are_read(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "settings:\n  log_group: 7\n  log_rate: 3\n  log_burst: 9\n"})
    settings = load_policy(root, now=NOW).settings
    assert (settings.log_group, settings.log_rate, settings.log_burst) == (7, 3, 9)


def test_a_utf8_bom_is_accepted(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": b"\xef\xbb\xbf" + one_cidr("10.0.0.0/8").encode()})
    https = load_policy(root / "p.yaml", now=NOW).service("https")
    assert https is not None
    assert [str(e.network) for e in https.entries] == ["10.0.0.0/8"]


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("valid", [True, False])
def test_loading_leaves_the_cyclic_collector_as_it_found_it(
    write_files: WriteFiles, enabled: bool, valid: bool
) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8" if valid else "10.0.0.1/8")})
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        if valid:
            load_policy(root, now=NOW)
        else:
            only_problem(root)
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


# --- unknown keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "entry", "hint"),
    [
        ("servises:\n  https: {}\n", 1, "servises", "did you mean 'services'?"),
        ("services:\n  web:\n    ports: [80]\n    protocol: [tcp]\n", 4,
         "services.web.protocol", "did you mean 'protocols'?"),
        (one_cidr("10.0.0.0/8") + "        expire: 2027-01-01T00:00:00Z\n", 8,
         "services.https.allow[0].expire (cidr 10.0.0.0/8)", "did you mean 'expires'?"),
        ("settings:\n  log_groop: 5\n", 2, "settings.log_groop", "did you mean 'log_group'?"),
    ],
    ids=["top-level", "service", "entry", "settings"],
)
def test_unknown_key_is_located_and_suggests_the_valid_key(
    write_files: WriteFiles, text: str, line: int, entry: str, hint: str
) -> None:
    root = write_files({"p.yaml": text})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", line, entry)
    assert "unknown key" in problem.message
    assert hint in problem.message
    assert "valid keys here:" in problem.message


# --- addresses -------------------------------------------------------------------------

MALFORMED_HINT = "write e.g. 203.0.113.45/32"


@pytest.mark.parametrize(
    ("cidr", "hints"),
    [
        ("300.1.2.3", [MALFORMED_HINT]),
        ("1.2.3", [MALFORMED_HINT]),
        ("010.0.0.1", [MALFORMED_HINT, "without leading zeros"]),
        ("10.0.0.0/33", [MALFORMED_HINT]),
        ("2001:db8::/129", [MALFORMED_HINT]),
        ("fe80::1%eth0", ["zone id", "write the address without %zone"]),
        ("10.0.0.1 /32", ["white space", "write the CIDR alone"]),
        ("10.0.0.1/32\t", ["white space", "write the CIDR alone"]),
        ("10.0.0.1/", ["bad prefix length", "write e.g. /24 or /32"]),
        ("203.0.113.5/24", ["host bits set", "203.0.113.5/32", "203.0.113.0/24"]),
        ("2001:db8::1/64", ["host bits set", "2001:db8::1/128", "2001:db8::/64"]),
        ("0.0.0.0/0", ["allows every address", "list the networks that need access instead"]),
        ("::/0", ["allows every address", "list the networks that need access instead"]),
        ("::ffff:192.0.2.1", ["IPv4-mapped", "write 192.0.2.1/32 instead"]),
        ("::ffff:192.0.2.0/120", ["IPv4-mapped", "write 192.0.2.0/24 instead"]),
        ("::192.0.2.1", ["IPv4-compatible", "write the IPv4 address itself"]),
    ],
)
def test_bad_cidr_is_located_and_says_what_to_write(
    write_files: WriteFiles, cidr: str, hints: list[str]
) -> None:
    root = write_files({"p.yaml": one_cidr(cidr)})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, f"services.https.allow[0].cidr (cidr {cidr})")
    for hint in hints:
        assert hint in problem.message


def test_a_bare_address_is_a_single_host(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("192.0.2.7")})
    https = load_policy(root, now=NOW).service("https")
    assert https is not None
    assert [str(e.network) for e in https.entries] == ["192.0.2.7/32"]


def test_every_problem_of_a_file_is_reported_at_once(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        "services:\n  https:\n    allow:\n"
        f"      - cidr: 300.1.2.3\n{META}"
        f"      - cidr: 10.0.0.5/8\n{META}"
    )})
    with pytest.raises(PolicyError) as caught:
        load_policy(root, now=NOW)

    assert [(p.line, p.entry.split(" ")[0]) for p in caught.value.problems] == [
        (4, "services.https.allow[0].cidr"),
        (8, "services.https.allow[1].cidr"),
    ]
    assert str(caught.value).endswith("(and 1 more)")


# --- services: names, duplicates, ports -------------------------------------------------


def test_same_service_key_twice_in_one_file_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        "services:\n  https:\n    allow: []\n  https:\n    allow: []\n"
    )})
    problem = only_problem(root / "p.yaml")

    assert (problem.file, problem.line) == (str(root / "p.yaml"), 4)
    assert "key 'https' appears twice" in problem.message
    assert "keep one" in problem.message


def test_service_defined_in_two_files_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({
        "a.yaml": "services:\n  metrics:\n    ports: [9100]\n",
        "b.yaml": "# second file\nservices:\n  metrics:\n    action: reject\n",
    })
    problem = only_problem(root)

    assert_located(problem, root / "b.yaml", 3, "services.metrics")
    assert f"already defined in {root / 'a.yaml'}:2" in problem.message
    assert "define ports/protocols/action/widest/entry_counters/log in one file" in problem.message


@pytest.mark.parametrize("key", ["ports: [9101]", "protocols: [udp]", "action: drop"])
def test_each_defining_key_counts_as_a_definition(write_files: WriteFiles, key: str) -> None:
    root = write_files({
        "a.yaml": "services:\n  metrics:\n    ports: [9100]\n",
        "b.yaml": f"services:\n  metrics:\n    {key}\n",
    })
    assert "already defined" in only_problem(root).message


def test_files_adding_entries_to_the_same_service_merge(write_files: WriteFiles) -> None:
    root = write_files({
        "a.yaml": one_cidr("10.0.0.0/8"),
        "b.yaml": one_cidr("192.0.2.0/24") + "  metrics:\n    ports: [9100]\n",
        "c.yml": "services:\n  metrics:\n    allow:\n      - cidr: 10.9.0.0/16\n" + META,
        "notes.txt": "not a policy file",
    })
    policy = load_policy(root, now=NOW)

    assert policy.files == (root / "a.yaml", root / "b.yaml", root / "c.yml")
    https, metrics = policy.service("https"), policy.service("metrics")
    assert https is not None and metrics is not None
    assert [(str(e.network), Path(e.origin.file).name) for e in https.entries] == [
        ("10.0.0.0/8", "a.yaml"),
        ("192.0.2.0/24", "b.yaml"),
    ]
    assert [str(e.network) for e in metrics.entries] == ["10.9.0.0/16"]
    assert metrics.ports == (PortRange(9100, 9100),)


def test_custom_service_claiming_a_builtin_port_is_reported_at_the_custom_service(
    write_files: WriteFiles,
) -> None:
    # "api" sorts before "https": the error must still land on the service the operator wrote.
    root = write_files({"p.yaml": "services:\n  api:\n    ports: [443]\n    protocols: [tcp]\n"})
    problem = only_problem(root / "p.yaml")

    assert str(problem).startswith(f"{root / 'p.yaml'}:2: services.api: ")
    assert "port 443/tcp is also claimed by service 'https' (built-in)" in problem.message
    assert "pick another port" in problem.message


def test_overlapping_port_ranges_of_two_services_conflict_per_protocol(
    write_files: WriteFiles,
) -> None:
    root = write_files({"p.yaml": (
        "services:\n"
        "  alpha:\n    ports: ['9000-9100']\n    protocols: [tcp]\n"
        "  beta:\n    ports: [9050]\n    protocols: [udp, tcp]\n"
        "  gamma:\n    ports: [9050]\n    protocols: [udp]\n"
    )})
    found = problems(root / "p.yaml")

    rendered = [str(p) for p in found]
    assert rendered == [
        f"{root / 'p.yaml'}:5: services.beta: port 9050/tcp is also claimed by service 'alpha' "
        f"({root / 'p.yaml'}:2); a port belongs to one service, so add the entries to 'alpha' "
        "or pick another port",
        f"{root / 'p.yaml'}:8: services.gamma: port 9050/udp is also claimed by service 'beta' "
        f"({root / 'p.yaml'}:5); a port belongs to one service, so add the entries to 'beta' "
        "or pick another port",
    ]


def test_same_port_on_different_protocols_is_not_a_conflict(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        "services:\n  quic:\n    ports: [8443]\n    protocols: [udp]\n"
        "  web:\n    ports: [8443]\n    protocols: [tcp]\n"
    )})
    assert {s.name for s in load_policy(root, now=NOW).services} >= {"quic", "web"}


@pytest.mark.parametrize("body", ["", "    allow:\n      - cidr: 10.0.0.0/8\n" + META])
def test_custom_service_without_ports_is_an_error_naming_its_file(
    write_files: WriteFiles, body: str
) -> None:
    root = write_files({"p.yaml": "services:\n  web:\n" + body})
    problem = only_problem(root / "p.yaml")

    assert str(problem).startswith(f"{root / 'p.yaml'}:2: services.web: "), str(problem)
    assert "needs ports: [...]" in problem.message
    assert "built-in services: https, postgres" in problem.message


def test_bad_service_name_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services:\n  Web-Site:\n    ports: [80]\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 2, "services.Web-Site")
    assert "a-z, 0-9 and _" in problem.message


@pytest.mark.parametrize(
    ("ports", "hint"),
    [
        ("[0]", "port 0 is outside 1-65535"),
        ("[65536]", "port 65536 is outside 1-65535"),
        ("['1-65536']", "port 65536 is outside 1-65535"),
        ("['http']", "write 443 or '8000-8100'"),
        ("['8000 to 8100']", "write 443 or '8000-8100'"),
        ("['9300-9200']", "is reversed; write '9200-9300'"),
        ("[true]", "a port is a number (443) or a range string ('8000-8100')"),
        ("[1.5]", "a port is a number (443) or a range string ('8000-8100')"),
        ("[]", "ports is empty; list at least one port"),
    ],
)
def test_bad_ports_are_located_and_say_what_to_write(
    write_files: WriteFiles, ports: str, hint: str
) -> None:
    root = write_files({"p.yaml": f"services:\n  web:\n    ports: {ports}\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 3, "services.web.ports")
    assert hint in problem.message


def test_empty_protocols_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services:\n  web:\n    ports: [80]\n    protocols: []\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, "services.web.protocols")
    assert "write [tcp], [udp] or [tcp, udp]" in problem.message


def test_unknown_protocol_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services:\n  web:\n    ports: [80]\n    protocols: [sctp]\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, "services.web.protocols[0]")
    assert "'tcp' or 'udp'" in problem.message and "'sctp'" in problem.message


def test_unknown_action_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services:\n  web:\n    ports: [80]\n    action: accept\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, "services.web.action")
    assert "'drop' or 'reject'" in problem.message and "(got 'accept')" in problem.message


# --- allow entries ----------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["owner", "reason", "review_by"])
def test_missing_metadata_is_an_error(write_files: WriteFiles, missing: str) -> None:
    lines = [line for line in META.splitlines(keepends=True) if f"{missing}:" not in line]
    root = write_files({"p.yaml": "services:\n  https:\n    allow:\n      - cidr: 10.0.0.0/8\n"
                                  + "".join(lines)})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4,
                   f"services.https.allow[0].{missing} (cidr 10.0.0.0/8)")
    assert problem.message == f"required key {missing!r} is missing"


def test_empty_owner_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8").replace("owner: platform", "owner: ''")})
    problem = only_problem(root / "p.yaml")
    assert_located(problem, root / "p.yaml", 5, "services.https.allow[0].owner (cidr 10.0.0.0/8)")


@pytest.mark.parametrize(
    "entry",
    [
        "      - cidr: 10.0.0.0/8\n        file: list.txt\n" + META,
        "      - owner: platform\n        reason: app servers\n        review_by: 2027-06-30\n",
    ],
    ids=["both", "neither"],
)
def test_entry_needs_exactly_one_of_cidr_and_file(write_files: WriteFiles, entry: str) -> None:
    root = write_files({"p.yaml": "services:\n  https:\n    allow:\n" + entry,
                        "list.txt": "192.0.2.0/24\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, "services.https.allow[0]")
    assert "exactly one of cidr: or file:" in problem.message


@pytest.mark.parametrize("expires", ["2027-01-01T00:00:00", "2027-01-01"])
def test_expires_without_time_zone_is_an_error(write_files: WriteFiles, expires: str) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8") + f"        expires: {expires}\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 8, "services.https.allow[0].expires (cidr 10.0.0.0/8)")
    assert "needs a time zone" in problem.message
    assert "add Z for UTC, e.g. 2027-01-01T00:00:00Z" in problem.message


def test_expired_entry_is_a_warning_and_not_loaded(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": (
        one_cidr("10.0.0.0/8") + "        expires: 2026-05-31T23:59:59Z\n"
        "      - cidr: 192.0.2.0/24\n" + META
        + "        expires: 2026-06-01T00:00:01+02:00\n"
        "      - cidr: 198.51.100.0/24\n" + META
        + "        expires: 2026-06-01T00:00:01Z\n"
    )})
    policy = load_policy(root / "p.yaml", now=NOW)

    https = policy.service("https")
    assert https is not None
    assert [str(e.network) for e in https.entries] == ["198.51.100.0/24"]
    assert [str(e.network) for e in policy.expired] == ["10.0.0.0/8", "192.0.2.0/24"]
    assert policy.warnings() == [
        f"{root / 'p.yaml'}:4: services.https.allow[0]: 10.0.0.0/8 expired at "
        "2026-05-31T23:59:59Z; not loaded (remove it from the file)",
        f"{root / 'p.yaml'}:9: services.https.allow[1]: 192.0.2.0/24 expired at "
        "2026-05-31T22:00:01Z; not loaded (remove it from the file)",
    ]


def test_bad_review_by_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8").replace("2027-06-30", "soon")})
    problem = only_problem(root / "p.yaml")
    assert_located(problem, root / "p.yaml", 7, "services.https.allow[0].review_by (cidr 10.0.0.0/8)")
    assert "date" in problem.message


# --- file: lists ------------------------------------------------------------------------


def list_policy(list_name: str, extra: str = "") -> str:
    return f"services:\n  https:\n    allow:\n      - file: {list_name}\n{META}{extra}"


def test_list_file_is_relative_to_the_policy_file_and_skips_comments(
    write_files: WriteFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_files({
        "p.yaml": list_policy("lists/partner.txt"),
        "lists/partner.txt": (
            "# partner-c published ranges\n"
            "\n"
            "198.51.100.0/25   # first half\n"
            "   \n"
            "  2001:db8:c::/48\n"
            "#198.51.100.128/25\n"
        ),
    })
    monkeypatch.chdir(tmp_path)  # not the policy directory: resolution must not use the cwd
    policy = load_policy(root / "p.yaml", now=NOW)

    https = policy.service("https")
    assert https is not None
    list_file = str(root / "lists" / "partner.txt")
    assert [(str(e.network), e.origin.file, e.origin.line) for e in https.entries] == [
        ("198.51.100.0/25", list_file, 3),
        ("2001:db8:c::/48", list_file, 5),
    ]
    assert all(e.owner == "platform" and e.review_by == date(2027, 6, 30) for e in https.entries)
    assert f"from {root / 'p.yaml'}:4" in https.entries[0].origin.entry


def test_bad_line_in_a_list_names_the_list_file_and_its_line(write_files: WriteFiles) -> None:
    root = write_files({
        "p.yaml": list_policy("partner.txt"),
        "partner.txt": "10.0.0.0/8\n# comment\n\n192.0.2.5/24\n198.51.100.0/24\n",
    })
    problem = only_problem(root / "p.yaml")

    assert problem.file == str(root / "partner.txt")
    assert problem.line == 4
    assert str(problem).startswith(
        f"{root / 'partner.txt'}:4: services.https.allow[0] file: partner.txt: "
    )
    assert "192.0.2.5/32" in problem.message and "192.0.2.0/24" in problem.message


def test_missing_list_file_is_reported_at_the_entry_once(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8") + f"      - file: nope.txt\n{META}"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 8, "services.https.allow[1]")
    assert f"cannot read list file {root / 'nope.txt'}" in problem.message


def test_non_utf8_list_file_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": list_policy("l.txt"), "l.txt": b"10.0.0.0/8 # caf\xe9\n"})
    problem = only_problem(root / "p.yaml")

    assert_located(problem, root / "p.yaml", 4, "services.https.allow[0]")
    assert "not UTF-8 text" in problem.message


def test_expired_list_entry_warns_for_every_line(write_files: WriteFiles) -> None:
    root = write_files({
        "p.yaml": list_policy("l.txt", "        expires: 2026-01-01T00:00:00Z\n"),
        "l.txt": "10.0.0.0/8\n192.0.2.0/24\n",
    })
    policy = load_policy(root / "p.yaml", now=NOW)

    https = policy.service("https")
    assert https is not None and https.entries == ()
    warnings = policy.warnings()
    assert len(warnings) == 3
    assert warnings[1].startswith(f"{root / 'l.txt'}:2: ")
    assert "192.0.2.0/24 expired at 2026-01-01T00:00:00Z" in warnings[1]
    assert "services.https: allows no source" in warnings[2]


# --- YAML and files ---------------------------------------------------------------------


def test_duplicate_key_inside_an_entry_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8").replace(
        "        owner: platform\n", "        owner: platform\n        owner: security\n")})
    problem = only_problem(root / "p.yaml")

    assert (problem.file, problem.line) == (str(root / "p.yaml"), 6)
    assert "key 'owner' appears twice in the same mapping; keep one" in problem.message


BILLION_LAUGHS = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(
            f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def test_alias_bomb_fails_fast_with_a_clear_message(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": BILLION_LAUGHS})
    problem = only_problem(root / "p.yaml")

    assert problem.file == str(root / "p.yaml")
    assert problem.line is not None
    # The counting check's words, not the builder's "expands to too many nodes": refused
    # before anything was built (test_yamlsource measures the memory that takes).
    assert "aliases expand the document to more than" in problem.message
    assert "alias bomb" in problem.message
    assert "write the values out" in problem.message


def test_alias_that_contains_itself_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services: &s\n  https: *s\n"})
    problem = only_problem(root / "p.yaml")
    assert (problem.file, problem.line) == (str(root / "p.yaml"), 1)
    assert "refers to a node that contains it" in problem.message


def test_merge_keys_are_refused(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "x: &m {owner: a}\nservices:\n  https:\n    <<: *m\n"})
    problem = only_problem(root / "p.yaml")
    assert problem.line == 4
    assert "merge keys (<<) are not supported; write the keys out" in problem.message


def test_non_utf8_policy_file_names_the_line(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": one_cidr("10.0.0.0/8").encode().replace(b"platform", b"caf\xe9")})
    problem = only_problem(root / "p.yaml")

    assert (problem.file, problem.line) == (str(root / "p.yaml"), 5)
    assert "not UTF-8 text; save the file as UTF-8" in problem.message


def test_yaml_syntax_error_gives_the_line(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "services:\n  https:\n    allow:\n      - cidr: [10.0.0.0/8\n"
                                  "        owner: a\n"})
    problem = only_problem(root / "p.yaml")

    assert (problem.file, problem.line) == (str(root / "p.yaml"), 5)
    assert problem.message.startswith("not valid YAML: ")


def test_a_document_that_is_not_a_mapping_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": "- https\n"})
    problem = only_problem(root / "p.yaml")
    assert (problem.line, problem.message) == (1, "a policy file is a mapping with a services: key")


def test_settings_in_two_files_is_an_error(write_files: WriteFiles) -> None:
    root = write_files({"a.yaml": "settings:\n  log_group: 5\n",
                        "b.yaml": "services: {}\nsettings:\n  log_group: 6\n"})
    problem = only_problem(root)

    assert_located(problem, root / "b.yaml", 2, "settings")
    assert f"already given in {root / 'a.yaml'}; keep them in one file" in problem.message


def test_policy_path_that_does_not_exist(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "absent")
    assert str(problem) == f"{tmp_path / 'absent'}: no such file or directory"


def test_directory_without_yaml_files(write_files: WriteFiles) -> None:
    root = write_files({"README.txt": "policies go here", "old.yaml.bak": "services: {}\n"})
    problem = only_problem(root)
    assert str(problem) == f"{root}: no *.yaml policy files in this directory"


def test_problems_from_several_files_are_all_reported(write_files: WriteFiles) -> None:
    root = write_files({"a.yaml": one_cidr("300.1.2.3"), "b.yaml": "bogus: 1\n"})
    assert [Path(p.file).name for p in problems(root)] == ["a.yaml", "b.yaml"]


def test_every_example_policy_is_valid() -> None:
    examples = sorted((Path(__file__).resolve().parents[2] / "policies" / "examples").glob("*.yaml"))
    assert len(examples) >= 5
    for path in examples:
        policy = load_policy(path, now=datetime(2026, 11, 1, tzinfo=UTC))
        assert policy.services and not policy.warnings(), path
