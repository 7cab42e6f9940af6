"""The compiler's output: a golden full load, its design properties, and determinism.

Regenerate the golden file after an intended change with

    HOSTWALL_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_compile.py

and review the diff of tests/unit/golden/full_load.nft before committing it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.cidr import Interval, IntervalSet, merge_intervals
from hostwall.compile import compile_policy
from hostwall.policy import load_policy
from hostwall.ruleset import (
    Ruleset,
    TableObjects,
    element_texts,
    render_clearing,
    render_element,
    render_full_load,
)

GOLDEN = Path(__file__).parent / "golden"
FIXED = datetime(2026, 6, 1, tzinfo=UTC)


def golden_ruleset(path: Path = GOLDEN / "policy.yaml") -> Ruleset:
    return compile_policy(load_policy(path, now=FIXED))


def golden_text(ruleset: Ruleset | None = None) -> str:
    return render_full_load(ruleset or golden_ruleset(), generation=7, now=FIXED.timestamp())


def test_full_load_matches_the_golden_file() -> None:
    text = golden_text()
    golden = GOLDEN / "full_load.nft"
    if os.environ.get("HOSTWALL_UPDATE_GOLDEN") == "1":
        golden.write_bytes(text.encode())
        pytest.skip(f"rewrote {golden}; review it with git diff")
    assert text == golden.read_bytes().decode()


# --- what the design asks of the ruleset, checked on the same output ---------------------


def chain(text: str, name: str) -> list[str]:
    match = re.search(rf"^\tchain {name} {{\n(.*?)^\t}}\n", text, re.MULTILINE | re.DOTALL)
    assert match, f"no chain {name}"
    return [line.strip() for line in match[1].splitlines()]


def set_body(text: str, name: str) -> list[str]:
    match = re.search(rf"^\tset {name} {{\n(.*?)^\t}}\n", text, re.MULTILINE | re.DOTALL)
    assert match, f"no set {name}"
    return [line.strip() for line in match[1].splitlines()]


def test_full_load_text_is_the_table_contents_labelled_by_the_generation_set() -> None:
    ruleset = golden_ruleset()
    lines = golden_text(ruleset).splitlines()

    assert lines[0] == "table inet hostwall {"
    assert lines[-1] == "}"
    assert sum(line.startswith("table ") for line in lines) == 1
    assert not any("delete" in line or "flush" in line for line in lines)
    assert set_body(golden_text(ruleset), "generation") == [
        "type mark",
        f'comment "hostwall generation=7 sha256={ruleset.digest}"',
        "elements = { 7 }",
    ]


def test_clearing_keeps_the_table_and_its_base_chain_and_removes_everything_else() -> None:
    existing = TableObjects(chains=("ingress", "svc_old", "svc_https"), sets=("generation", "old_v4"),
                            counters=("old_dropped",))
    assert render_clearing(existing).splitlines() == [
        "table inet hostwall { chain ingress { type filter hook prerouting priority -300; policy accept; }; }",
        "flush table inet hostwall",
        "delete chain inet hostwall svc_old",
        "delete chain inet hostwall svc_https",
        "delete set inet hostwall generation",
        "delete set inet hostwall old_v4",
        "delete counter inet hostwall old_dropped",
    ]
    assert "delete" not in render_clearing(TableObjects())


def test_ingress_chain_accepts_loopback_then_dispatches_by_port_with_rules() -> None:
    assert chain(golden_text(), "ingress") == [
        "type filter hook prerouting priority -300; policy accept;",
        'iif "lo" accept',
        "tcp dport 53 jump svc_dns",
        "udp dport 53 jump svc_dns",
        "tcp dport 443 jump svc_https",
        "udp dport 443 jump svc_https",
        "tcp dport 9100 jump svc_metrics",
        "tcp dport 9200-9299 jump svc_metrics",
        "tcp dport 5432 jump svc_postgres",
    ]


def test_strict_source_drops_reverse_path_failures_before_the_allowlist() -> None:
    strict = msgspec.structs.replace(golden_ruleset(), strict_source=True)
    text = render_full_load(strict, 7, FIXED.timestamp())
    # Forwarded traffic skips the spoof check too, so the route lookup stays first here.
    assert chain(text, "svc_https")[:4] == [
        "fib daddr type != local return",
        'fib saddr . iif oif missing limit rate 5/second burst 15 packets log prefix "hostwall:https:spoofed" '
        "group 42",
        'fib saddr . iif oif missing counter name "https_dropped" drop',
        'ip saddr @https_v4_hosts counter name "https_accepted" accept',
    ]
    assert "fib saddr" not in golden_text()
    assert strict.digest != golden_ruleset().digest
    assert Ruleset.from_data(strict.to_data()) == strict


def test_service_chain_filters_only_local_traffic_and_logs_rate_limited() -> None:
    assert chain(golden_text(), "svc_https") == [
        'ip saddr @https_v4_hosts counter name "https_accepted" accept',
        'ip saddr @https_v4 counter name "https_accepted" accept',
        'ip6 saddr @https_v6_hosts counter name "https_accepted" accept',
        'ip6 saddr @https_v6 counter name "https_accepted" accept',
        "fib daddr type != local return",
        'limit rate 5/second burst 15 packets log prefix "hostwall:https" group 42',
        'counter name "https_dropped" drop',
    ]


def test_reject_service_resets_tcp_and_answers_icmp_otherwise() -> None:
    assert chain(golden_text(), "svc_metrics")[-2:] == [
        'meta l4proto tcp counter name "metrics_dropped" reject with tcp reset',
        'counter name "metrics_dropped" reject with icmpx type port-unreachable',
    ]


def test_every_service_has_both_families_and_both_counters_even_when_empty() -> None:
    text = golden_text()
    for service in ("dns", "https", "metrics", "postgres"):
        for counter in ("accepted", "dropped"):
            assert f"\tcounter {service}_{counter} {{}}\n" in text
    assert set_body(text, "dns_v4") == ["type ipv4_addr", "flags interval", "auto-merge"]
    assert set_body(text, "postgres_v6") == ["type ipv6_addr", "flags interval", "auto-merge"]


def test_sets_hold_merged_elements_and_timeouts_without_auto_merge() -> None:
    text = golden_text()
    # Single addresses in the hash set, wider ranges in the interval set.
    assert set_body(text, "https_v4_hosts") == ["type ipv4_addr", "elements = { 203.0.113.45 }"]
    assert set_body(text, "https_v4")[-1] == "elements = { 192.0.2.1-192.0.2.3, 198.51.100.0/24 }"
    assert set_body(text, "https_v6")[-1] == (
        "elements = { 2001:db8:c::/48, "
        "2001:db8:11::-2001:db8:12:ffff:ffff:ffff:ffff:ffff }"
    )
    # 2027-01-01T00:00:00Z is 214 days after FIXED.
    assert set_body(text, "metrics_v4_hosts") == [
        "type ipv4_addr",
        "flags timeout",
        "elements = { 10.0.9.5 timeout 214d }",
    ]
    assert set_body(text, "metrics_v4") == [
        "type ipv4_addr",
        "flags interval, timeout",
        "elements = { 10.0.9.8/29 }",
    ]


@pytest.mark.parametrize(
    ("seconds_left", "rendered"),
    [(10.0, "timeout 10s"), (10.2, "timeout 11s"), (0.4, "timeout 1s"), (-5.0, "timeout 1s")],
)
def test_element_timeout_rounds_up_and_is_never_zero(seconds_left: float, rendered: str) -> None:
    interval = Interval(4, 1, 1, 1000.0 + seconds_left)
    assert render_element(interval, now=1000.0) == f"0.0.0.1/32 {rendered}"


# --- determinism ------------------------------------------------------------------------


def scatter_golden_policy(target: Path, *, reverse: bool) -> Path:
    """The golden policy, one file per definition or allow entry, in either order."""
    data = yaml.safe_load((GOLDEN / "policy.yaml").read_text())
    documents: list[dict[str, object]] = [{"settings": data["settings"]}]
    for name, service in data["services"].items():
        definition = {key: value for key, value in service.items() if key != "allow"}
        if definition:
            documents.append({"services": {name: definition}})
        documents.extend({"services": {name: {"allow": [entry]}}} for entry in service["allow"])
    if reverse:
        documents.reverse()
    target.mkdir()
    shutil.copy(GOLDEN / "partner-c-ranges.txt", target)
    for index, document in enumerate(documents):
        (target / f"{index:03d}.yaml").write_text(yaml.safe_dump(document))
    return target


def test_same_policy_compiles_to_the_same_bytes() -> None:
    first, second = golden_ruleset(), golden_ruleset()
    assert first.digest == second.digest
    assert golden_text(first) == golden_text(second)


def test_file_and_entry_order_do_not_change_the_output(tmp_path: Path) -> None:
    forward = scatter_golden_policy(tmp_path / "forward", reverse=False)
    backward = scatter_golden_policy(tmp_path / "backward", reverse=True)
    golden = golden_ruleset()

    for scattered in (forward, backward):
        ruleset = golden_ruleset(scattered)
        assert ruleset.digest == golden.digest
        assert golden_text(ruleset) == golden_text(golden)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("10.0.1.0/24", "10.0.2.0/24"),
        ("action: reject", "action: drop"),
        ("log_rate: 5", "log_rate: 6"),
        ("expires: 2027-01-01T00:00:00Z", "expires: 2027-01-01T00:00:01Z"),
        ('"9200-9299"', '"9200-9298"'),
    ],
)
def test_digest_changes_with_the_content(tmp_path: Path, old: str, new: str) -> None:
    shutil.copytree(GOLDEN, tmp_path / "edited")
    policy = tmp_path / "edited" / "policy.yaml"
    policy.write_text(policy.read_text().replace(old, new, 1))
    assert golden_ruleset(policy).digest != golden_ruleset().digest


def test_ruleset_data_round_trip_keeps_the_digest() -> None:
    ruleset = golden_ruleset()
    restored = Ruleset.from_data(json.loads(json.dumps(ruleset.to_data())))

    assert restored == ruleset
    assert restored.digest == ruleset.digest
    assert golden_text(restored) == golden_text(ruleset)


@pytest.mark.parametrize(("seconds", "rendered"), [
    (1, "1s"), (61, "1m1s"), (86400, "1d"), (10**8, "1157d9h46m40s"), (20 * 365 * 86400, "7300d"),
])
def test_long_timeouts_are_written_in_units_nft_accepts(seconds: int, rendered: str) -> None:
    # nft refuses "100000000s" as too large, while "1157d9h46m40s" loads.
    from hostwall.ruleset import _nft_duration

    assert _nft_duration(seconds) == rendered


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 6]), st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 2**20)),
                                         max_size=40))
def test_fast_element_text_equals_the_interval_text(family: int, spans: list[tuple[int, int]]) -> None:
    """element_texts formats permanent sets from their bytes; it must say exactly what
    str(Interval) says, prefixes and ranges, in both families."""
    top = 2**32 - 1 if family == 4 else 2**128 - 1
    intervals = IntervalSet.of(family, merge_intervals(
        Interval(family, start % top, min(start % top + length, top)) for start, length in spans))
    assert list(element_texts(intervals, 0.0)) == [render_element(i, 0.0) for i in intervals]
