"""Per-entry counters as audit evidence, against the in-memory kernel: the counter line in
the ruleset, what each element counted, and since when it has been counting."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

from test_engine_fake import FIXED, Setup

from hostwall.audit import AuditOptions, audit
from hostwall.cidr import Interval
from hostwall.compile import compile_policy
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load
from hostwall.usage import kernel_usage

META = "        owner: platform\n        reason: test\n        review_by: 2099-01-01\n"
DAY = 86400.0


def policy(*cidrs: str, counters: bool = True) -> str:
    head = "    entry_counters: true\n" if counters else ""
    return ("services:\n  postgres:\n" + head + "    allow:\n"
            + "".join(f"      - cidr: {cidr}\n{META}" for cidr in cidrs))


def address(text: str) -> int:
    return int(ipaddress.ip_address(text))


def interval(cidr: str) -> Interval:
    return Interval.of(ipaddress.ip_network(cidr))


def test_entry_counters_put_a_counter_on_the_set_and_change_the_digest(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(policy("10.0.1.0/24"))
    (tmp_path / "b.yaml").write_text(policy("10.0.1.0/24", counters=False))
    counted = compile_policy(load_policy(tmp_path / "a.yaml"))
    plain = compile_policy(load_policy(tmp_path / "b.yaml"))

    assert "\t\tcounter\n" in render_full_load(counted, 1, 0.0)
    assert "\t\tcounter\n" not in render_full_load(plain, 1, 0.0)
    assert counted.digest != plain.digest
    assert "entry_counters" not in plain.services[0].structure()


def test_usage_counts_per_element_since_the_full_load(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.engine.apply(setup.policy(policy("10.0.1.0/24", "10.0.3.0/24", "10.0.4.0/24")), user="t", message="")
    loaded_at = setup.clock.now
    setup.clock.now += 100 * DAY
    setup.backend.hit("postgres_v4", address("10.0.3.7"), 3)

    usage, note = kernel_usage(setup.engine, setup.state, setup.clock)
    assert note is None and usage is not None
    assert usage.packets("postgres", interval("10.0.1.0/24")) == (0, loaded_at)
    assert usage.packets("postgres", interval("10.0.3.0/24")) == (3, loaded_at)
    # Adjacent entries are one kernel element: a packet to one counts for both.
    assert usage.packets("postgres", interval("10.0.4.0/24")) == (3, loaded_at)
    assert usage.packets("postgres", interval("10.9.0.0/24")) is None
    assert usage.packets("https", interval("10.0.1.0/24")) is None  # no counters there


def test_elements_a_delta_created_count_from_that_delta(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.engine.apply(setup.policy(policy("10.0.1.0/24", "10.0.2.0/24")), user="t", message="")
    full_at = setup.clock.now
    setup.clock.now += 50 * DAY
    result = setup.engine.apply(setup.policy(policy("10.0.1.0/24", "10.0.2.0/24", "10.0.5.0/24")),
                                user="t", message="")
    assert result.method == "delta"
    delta_at = setup.clock.now
    setup.clock.now += 50 * DAY
    result = setup.engine.apply(setup.policy(policy("10.0.1.0/24", "10.0.2.0/24", "10.0.5.0/24",
                                                    "10.0.7.0/24")), user="t", message="")
    assert result.method == "delta"
    second_delta_at = setup.clock.now
    setup.clock.now += DAY

    usage, _ = kernel_usage(setup.engine, setup.state, setup.clock)
    assert usage is not None
    assert usage.packets("postgres", interval("10.0.1.0/24")) == (0, full_at)
    assert usage.packets("postgres", interval("10.0.5.0/24")) == (0, delta_at)
    assert usage.packets("postgres", interval("10.0.7.0/24")) == (0, second_delta_at)

    now = datetime.fromtimestamp(setup.clock.now, UTC)
    findings = audit(load_policy(setup.policy_dir, now=now), AuditOptions(now, usage=usage, unused_days=90))
    # 10.0.5.0/24 has counted for 51 days only: no evidence for 90.
    assert [(f.rule, f.subject) for f in findings] == [("unused", "10.0.1.0/24"), ("unused", "10.0.2.0/24")]


def test_no_evidence_without_counters_or_on_drift(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    assert kernel_usage(setup.engine, setup.state, setup.clock) == (None, "no hostwall table is loaded")
    setup.engine.apply(setup.policy(policy("10.0.1.0/24", counters=False)), user="t", message="")
    assert kernel_usage(setup.engine, setup.state, setup.clock) == (None, "no service has entry_counters: true")

    setup.engine.apply(setup.policy(policy("10.0.1.0/24")), user="t", message="")
    assert setup.backend.table is not None
    setup.backend.table.sets["postgres_v4"] = ()  # removed behind hostwall's back
    usage, note = kernel_usage(setup.engine, setup.state, setup.clock)
    assert usage is None and note is not None and "drift" in note


def test_audit_reads_no_counters_before_the_window_has_passed(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.engine.apply(setup.policy(policy("10.0.1.0/24")), user="t", message="")
    setup.clock.now += 10 * DAY
    usage, _ = kernel_usage(setup.engine, setup.state, setup.clock)
    now = FIXED + timedelta(days=10)

    assert audit(load_policy(setup.policy_dir, now=now), AuditOptions(now, usage=usage, unused_days=30)) == []
    assert [f.rule for f in audit(load_policy(setup.policy_dir, now=now),
                                  AuditOptions(now, usage=usage, unused_days=7))] == ["unused"]
