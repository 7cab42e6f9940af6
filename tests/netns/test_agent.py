"""The agent under a harness that plays systemd: NOTIFY_SOCKET, WATCHDOG_USEC, signals."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns_support import Cli, Harness, Journald, Nft, output, reach, wait_for_records

from hostwall.drops import MESSAGE_ID_DRIFT, MESSAGE_ID_POLICY
from hostwall.engine import Engine
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.state import StateDir

pytestmark = pytest.mark.root

ALLOWED_ONLY = {("allowed", 4, "5432/tcp"): "open", ("denied", 4, "5432/tcp"): "timeout"}
NOBODY = {("allowed", 4, "5432/tcp"): "timeout", ("denied", 4, "5432/tcp"): "timeout"}


def _policy(policy_dir: Path, cidrs: list[str]) -> None:
    allow = [{"cidr": c, "owner": "t", "reason": "t", "review_by": "2099-01-01"} for c in cidrs]
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump({"services": {"postgres": {"allow": allow}}}))


@pytest.fixture
def harness(lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path, journald: Journald) -> Iterator[Any]:
    started: list[Harness] = []

    def start(*args: str, **kwargs: Any) -> Harness:
        agent = Harness(lab, policy_dir, state_dir, tmp_path, *args, **kwargs)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.close()


def _table_exists(nft: Nft) -> bool:
    return nft("list", "table", "inet", "hostwall", check=False).returncode == 0


def test_ready_only_after_the_table_exists_then_reload_watchdog_and_stop(
    lab: Lab, policy_dir: Path, nft: Nft, hostwall: Cli, harness: Any
) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    assert not _table_exists(nft)
    agent = harness()
    agent.wait_for("READY=1")
    assert _table_exists(nft), "READY=1 was sent before the kernel held the ruleset"
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    ready = next(m for _, m in agent.messages if "READY=1" in m)
    assert "STATUS=generation 1 loaded, 1 entries" in ready

    # Pings keep coming (a deadline, not a rate: a loaded machine only makes them later),
    # and never more often than every WATCHDOG_USEC/2 since the agent was started.
    pings_before = agent.count("WATCHDOG=1")
    agent.wait_for("WATCHDOG=1", seconds=60, occurrence=pings_before + 5)
    elapsed = time.monotonic() - agent.started
    pings = agent.count("WATCHDOG=1")
    assert pings <= elapsed / 0.5 + 1, f"{pings} watchdog pings in {elapsed:.1f} s; at most one per 0.5 s"

    _policy(policy_dir, ["192.0.2.0/24"])
    readies = agent.count("READY=1")
    agent.process.send_signal(signal.SIGHUP)
    reloading = agent.wait_for("RELOADING=1")
    reloading_message = next(m for s, m in agent.messages if s == reloading)
    assert "MONOTONIC_USEC=" in reloading_message
    assert agent.wait_for("READY=1", occurrence=readies + 1) > reloading
    assert output(hostwall("status", "--json"))["generation"] == 2
    assert reach(lab, NOBODY) == NOBODY

    assert agent.stop() == 0
    agent.collect(0.0)
    assert any("STOPPING=1" in m for _, m in agent.messages)
    assert _table_exists(nft), "stopping the agent must leave the firewall in place"
    assert reach(lab, NOBODY) == NOBODY


def test_restart_with_an_invalid_policy_keeps_the_last_good_generation(
    lab: Lab, policy_dir: Path, hostwall: Cli, harness: Any
) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    assert hostwall("apply").returncode == 0
    (policy_dir / "policy.yaml").write_text("services:\n  postgres:\n    allow:\n      - cidr: 10.0.0.1/8\n")
    agent = harness()
    agent.wait_for("READY=1")
    assert output(hostwall("status", "--json"))["generation"] == 1
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    records = wait_for_records(lab.server, lambda r: len(r) > 0, f"MESSAGE_ID={MESSAGE_ID_POLICY}")
    assert records and "policy invalid on start" in records[-1]["MESSAGE"]
    assert agent.stop() == 0


def test_fail_closed_without_policy_or_generation(
    lab: Lab, policy_dir: Path, nft: Nft, harness: Any
) -> None:
    (policy_dir / "policy.yaml").write_text("services: [this is not a mapping]\n")
    agent = harness()
    agent.wait_for("READY=1")
    assert _table_exists(nft)
    assert reach(lab, NOBODY) == NOBODY
    loopback = {("allowed", 4, "8080/tcp"): "open"}
    assert reach(lab, loopback) == loopback  # unprotected ports stay open
    from hostwall.lab import probe_tcp
    assert probe_tcp(lab.server, "127.0.0.1", 5432, 3.0) == "open"  # loopback always allowed
    assert agent.stop() == 0


def _set_elements(nft: Nft, name: str) -> str:
    return nft("list", "set", "inet", "hostwall", name).stdout


def test_a_deleted_table_is_restored_on_the_change_event(
    lab: Lab, policy_dir: Path, nft: Nft, hostwall: Cli, harness: Any
) -> None:
    """The README's "within a second" rests on the nf_tables change event, not on a timer:
    with the periodic full check an hour away, only the event can bring the table back."""
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    agent = harness("--full-check-interval", "3600")
    agent.wait_for("READY=1")

    nft("delete", "table", "inet", "hostwall")
    deadline = time.monotonic() + 60
    while not _table_exists(nft) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _table_exists(nft), "the deleted table was not restored"
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    records = wait_for_records(lab.server, lambda r: len(r) >= 1, f"MESSAGE_ID={MESSAGE_ID_DRIFT}", seconds=60)
    assert records, "the repair was not reported"
    assert output(hostwall("status", "--json"))["drift"] == []
    assert agent.stop() == 0


def test_an_element_added_by_hand_is_found_by_the_full_check_and_reported(
    lab: Lab, policy_dir: Path, nft: Nft, hostwall: Cli, harness: Any
) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    agent = harness("--full-check-interval", "2")
    agent.wait_for("READY=1")

    # An element added by hand changes no label: the periodic full check finds it.
    nft("add", "element", "inet", "hostwall", "postgres_v4", f"{{ {lab.denied.ipv4} }}")
    deadline = time.monotonic() + 60
    while lab.denied.ipv4 in _set_elements(nft, "postgres_v4") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lab.denied.ipv4 not in _set_elements(nft, "postgres_v4"), "the element added by hand stayed"
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    records = wait_for_records(lab.server, lambda r: len(r) >= 1, f"MESSAGE_ID={MESSAGE_ID_DRIFT}", seconds=60)
    assert records, "the repair was not reported"
    assert output(hostwall("status", "--json"))["drift"] == []
    assert agent.stop() == 0


def test_agent_enforces_confirmation_deadlines_and_distrusts_them_after_boot(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, harness: Any
) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    assert hostwall("apply").returncode == 0
    backend = NftBackend(lab.server)
    try:
        engine = Engine(backend, StateDir(state_dir))  # no detached reverter: only the agent can revert
        _policy(policy_dir, ["192.0.2.0/24"])
        engine.apply(load_policy(policy_dir), user="t", message="risky", confirm_within=3)
    finally:
        backend.close()
    assert reach(lab, NOBODY) == NOBODY
    agent = harness()
    agent.wait_for("READY=1")
    deadline = time.monotonic() + 10
    while output(hostwall("status", "--json"))["generation"] != 1 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert output(hostwall("status", "--json"))["generation"] == 1
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    assert agent.stop() == 0

    # A change still unconfirmed at boot is rolled back at once, deadline or not, and the
    # policy on disk that produced it is not loaded again by the agent on its own.
    backend = NftBackend(lab.server)
    try:
        Engine(backend, StateDir(state_dir)).apply(load_policy(policy_dir), user="t", message="risky again",
                                                   confirm_within=3600)
    finally:
        backend.close()
    before_boot = float(Path("/proc/stat").read_text().split("btime ")[1].split()[0]) - 60
    os.utime(state_dir / "pending.json", (before_boot, before_boot))
    agent = harness()
    agent.wait_for("READY=1")
    status = output(hostwall("status", "--json"))
    assert (status["generation"], status["pending"]) == (1, None)
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    assert agent.stop() == 0


def test_metrics_textfile(lab: Lab, policy_dir: Path, tmp_path: Path, harness: Any) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    metrics = tmp_path / "hostwall.prom"
    agent = harness("--metrics-file", str(metrics), "--metrics-interval", "1")
    agent.wait_for("READY=1")
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    time.sleep(2.5)
    text = metrics.read_text()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['hostwall_packets_total{service="postgres",verdict="accepted"}'] > 0
    assert values['hostwall_packets_total{service="postgres",verdict="dropped"}'] > 0
    assert values['hostwall_entries{service="postgres"}'] == 1
    assert values["hostwall_generation"] == 1
    assert values["hostwall_last_apply_success"] == 1
    assert "hostwall_drift_repairs_total" in text and "hostwall_log_events_lost_total" in text
    assert agent.stop() == 0
