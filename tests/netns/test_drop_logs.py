"""Drop logs end to end: kernel NFLOG -> agent -> real journald -> journalctl."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns_support import COMMAND_TIMEOUT, Cli, Journald, journal_records, reach, send_udp, wait_for_records

from hostwall.drops import (
    MESSAGE_ID_AGENT,
    MESSAGE_ID_CHANGE,
    MESSAGE_ID_DROP,
    MESSAGE_ID_DROP_SUMMARY,
    MESSAGE_ID_LOST,
    MESSAGE_ID_RECON,
)
from hostwall.lab import Lab

pytestmark = pytest.mark.root


def _policy(policy_dir: Path, lab: Lab, *, log_rate: int = 10, log_burst: int = 20) -> None:
    entry = {"cidr": f"{lab.allowed.ipv4}/32", "owner": "t", "reason": "t", "review_by": "2099-01-01"}
    document = {"services": {"https": {"allow": [entry]}, "postgres": {"allow": [entry]}},
                "settings": {"log_rate": log_rate, "log_burst": log_burst}}
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump(document))


class Agent:
    def __init__(self, lab: Lab, policy_dir: Path, state_dir: Path, *args: str) -> None:
        self.lab = lab
        command = [sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir", str(policy_dir),
                   "--state-dir", str(state_dir), "agent", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = wait_for_records(lab.server, lambda r: len(r) > 0, f"MESSAGE_ID={MESSAGE_ID_AGENT}", seconds=60)
        if not started:
            self.stop()
            pytest.fail(f"the agent did not start: {self.process.stderr.read() if self.process.stderr else ''}")

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=COMMAND_TIMEOUT)
        return self.process.returncode, stderr


@pytest.fixture
def start_agent(lab: Lab, policy_dir: Path, state_dir: Path, journald: Journald) -> Iterator[Any]:
    agents: list[Agent] = []

    def start(*args: str) -> Agent:
        agent = Agent(lab, policy_dir, state_dir, *args)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


def _count(records: list[dict[str, Any]]) -> int:
    return sum(int(r.get("HOSTWALL_COUNT", "0")) for r in records)


def test_denied_connections_become_journal_records_with_every_field(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any
) -> None:
    _policy(policy_dir, lab)
    assert hostwall("apply").returncode == 0
    generation = "1"
    start_agent()
    denied = {("denied", family, target): "timeout" for family in (4, 6)
              for target in ("443/tcp", "443/udp", "5432/tcp")}
    assert reach(lab, denied) == denied

    records = wait_for_records(lab.server, lambda r: len(r) >= 6, f"MESSAGE_ID={MESSAGE_ID_DROP}")
    seen = {(r["HOSTWALL_SRC"], r["HOSTWALL_DPORT"], r["HOSTWALL_PROTO"]) for r in records}
    for source in (lab.denied.ipv4, lab.denied.ipv6):
        assert {(source, "443", "tcp"), (source, "443", "udp"), (source, "5432", "tcp")} <= seen
    record = next(r for r in records if r["HOSTWALL_SRC"] == lab.denied.ipv6 and r["HOSTWALL_DPORT"] == "5432")
    assert record["HOSTWALL_SERVICE"] == "postgres"
    assert record["HOSTWALL_DST"] == lab.denied.server_ipv6
    assert record["HOSTWALL_IIF"] == "hwbad"
    assert record["HOSTWALL_GENERATION"] == generation
    assert int(record["HOSTWALL_SRC_PORT"]) > 0
    assert record["SYSLOG_IDENTIFIER"] == "hostwall" and record["PRIORITY"] == "5"
    assert record["MESSAGE"] == (f"dropped tcp [{lab.denied.ipv6}]:{record['HOSTWALL_SRC_PORT']} -> "
                                 f"[{lab.denied.server_ipv6}]:5432 service=postgres iface=hwbad")
    # The allowed client leaves no trace.
    assert lab.allowed.ipv4 not in {r["HOSTWALL_SRC"] for r in records}

    drops = subprocess.run([sys.executable, "-m", "hostwall", "--netns", lab.server, "drops", "--top", "2"],
                           capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    assert drops.returncode == 0 and lab.denied.ipv4 in drops.stdout


def test_drop_records_carry_the_generation_loaded_by_a_reload(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any
) -> None:
    """The generation is read when drops are recorded, not once when the agent starts."""
    _policy(policy_dir, lab)
    assert hostwall("apply").returncode == 0
    agent = start_agent()
    before = {("denied", 4, "443/tcp"): "timeout"}
    assert reach(lab, before) == before
    first = wait_for_records(lab.server, lambda r: len(r) >= 1, f"MESSAGE_ID={MESSAGE_ID_DROP}",
                             "HOSTWALL_DPORT=443", seconds=60)
    assert first and {r["HOSTWALL_GENERATION"] for r in first} == {"1"}, first
    _policy(policy_dir, lab, log_rate=11)  # another policy: the reload loads generation 2
    agent.process.send_signal(signal.SIGHUP)
    loaded = wait_for_records(lab.server, lambda r: any(x.get("HOSTWALL_GENERATION") == "2" for x in r),
                              f"MESSAGE_ID={MESSAGE_ID_CHANGE}", seconds=60)
    assert any(r.get("HOSTWALL_GENERATION") == "2" for r in loaded), loaded
    probe = {("denied", 4, "5432/tcp"): "timeout"}
    assert reach(lab, probe) == probe
    records = wait_for_records(lab.server, lambda r: len(r) >= 1, f"MESSAGE_ID={MESSAGE_ID_DROP}",
                               "HOSTWALL_DPORT=5432", seconds=60)
    assert records and {r["HOSTWALL_GENERATION"] for r in records} == {"2"}, records


def test_a_flood_is_summarised_and_every_drop_is_counted(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any
) -> None:
    _policy(policy_dir, lab, log_rate=100_000, log_burst=100_000)  # let the kernel log every packet
    assert hostwall("apply").returncode == 0
    agent = start_agent("--flood-window", "120", "--flood-records", "5", "--recon-per-minute", "100")
    sent = 3000
    send_udp(lab.denied.namespace, lab.denied.server_ipv4, 443, sent)
    time.sleep(1.0)
    returncode, stderr = agent.stop()
    assert returncode == 0, stderr

    stopped = wait_for_records(lab.server, lambda r: any("HOSTWALL_DROPS_READ" in x for x in r),
                               f"MESSAGE_ID={MESSAGE_ID_AGENT}")
    read = int(next(r for r in stopped if "HOSTWALL_DROPS_READ" in r)["HOSTWALL_DROPS_READ"])
    lost = int(next(r for r in stopped if "HOSTWALL_LOST_TOTAL" in r)["HOSTWALL_LOST_TOTAL"])
    drops = journal_records(lab.server, f"MESSAGE_ID={MESSAGE_ID_DROP}")
    summaries = journal_records(lab.server, f"MESSAGE_ID={MESSAGE_ID_DROP_SUMMARY}")
    warnings = journal_records(lab.server, f"MESSAGE_ID={MESSAGE_ID_RECON}")

    status = subprocess.run([sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir",
                             str(policy_dir), "--state-dir", str(policy_dir.parent / "state"), "status", "--json"],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    https = next(s for s in json.loads(status.stdout)["services"] if s["name"] == "https")
    assert https["dropped_packets"] == sent  # the kernel dropped every datagram
    assert read + lost == sent
    assert len(drops) == 5 and len(summaries) == 1, "a flood must not fill the journal"
    assert _count(drops) + _count(summaries) == read
    assert len(warnings) == 1 and warnings[0]["PRIORITY"] == "4"
    assert warnings[0]["HOSTWALL_SRC"] == lab.denied.ipv4


def test_overflow_is_counted_and_reported(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any
) -> None:
    _policy(policy_dir, lab, log_rate=100_000, log_burst=100_000)
    assert hostwall("apply").returncode == 0
    # A tiny receive buffer and one packet per message: the reader cannot keep up.
    agent = start_agent("--nflog-buffer", "1024", "--nflog-queue-threshold", "1", "--flood-records", "1")
    sent = 20_000
    send_udp(lab.denied.namespace, lab.denied.server_ipv4, 443, sent)
    time.sleep(1.0)
    # One more, after the burst drained: its sequence number reveals losses at the burst's end.
    send_udp(lab.denied.namespace, lab.denied.server_ipv4, 443, 1)
    time.sleep(0.5)
    returncode, stderr = agent.stop()
    assert returncode == 0, stderr

    stopped = wait_for_records(lab.server, lambda r: any("HOSTWALL_DROPS_READ" in x for x in r),
                               f"MESSAGE_ID={MESSAGE_ID_AGENT}")
    final = next(r for r in stopped if "HOSTWALL_DROPS_READ" in r)
    read, lost = int(final["HOSTWALL_DROPS_READ"]), int(final["HOSTWALL_LOST_TOTAL"])
    assert lost > 0, "the overflow did not happen; the test proves nothing"
    assert read + lost == sent + 1
    reports = journal_records(lab.server, f"MESSAGE_ID={MESSAGE_ID_LOST}")
    assert reports and sum(int(r["HOSTWALL_LOST"]) for r in reports) == lost


def test_agent_survives_journald_restart_and_records_resume(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any, journald: Journald
) -> None:
    if not journald.owned:
        if __import__("os").environ.get("CI"):
            pytest.fail("CI must own journald to test its restart")
        pytest.skip("the machine's own journald is running; not stopping it")
    _policy(policy_dir, lab)
    assert hostwall("apply").returncode == 0
    agent = start_agent()
    probes = {("denied", 4, "5432/tcp"): "timeout"}
    assert reach(lab, probes) == probes
    assert wait_for_records(lab.server, lambda r: len(r) >= 1, f"MESSAGE_ID={MESSAGE_ID_DROP}")

    journald.stop()
    try:
        assert reach(lab, probes) == probes  # logged while journald is gone
        time.sleep(0.5)
        assert agent.process.poll() is None, "the agent died with journald"
    finally:
        journald.start()
    time.sleep(2.5)  # the sink retries journald every 2 s
    before = len(journal_records(lab.server, f"MESSAGE_ID={MESSAGE_ID_DROP}"))
    assert reach(lab, probes) == probes
    after = wait_for_records(lab.server, lambda r: len(r) > before, f"MESSAGE_ID={MESSAGE_ID_DROP}")
    assert len(after) > before, "records did not resume after journald came back"
    returncode, stderr = agent.stop()
    assert returncode == 0
    assert "hostwall: dropped tcp" in stderr  # the record made while journald was away


def test_drops_follow_prints_new_records_as_json(
    lab: Lab, policy_dir: Path, hostwall: Cli, start_agent: Any
) -> None:
    _policy(policy_dir, lab)
    assert hostwall("apply").returncode == 0
    start_agent()
    # A moment the test fixes before the drop, not one relative to when the follower
    # happens to start: however late it starts, it reads the drop, then follows.
    since = datetime.fromtimestamp(int(time.time()) - 1, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    follower = subprocess.Popen(
        [sys.executable, "-m", "hostwall", "--netns", lab.server, "drops", "--follow", "--json",
         "--service", "postgres", "--since", since],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        probe = {("denied", 6, "5432/tcp"): "timeout"}
        assert reach(lab, probe) == probe
        assert follower.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(follower.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), "drops --follow printed nothing within 60 s"
        record = json.loads(follower.stdout.readline())
        # Ports and counts as numbers (journal fields are text).
        assert (record["HOSTWALL_SRC"], record["HOSTWALL_DPORT"], record["HOSTWALL_SERVICE"],
                record["HOSTWALL_COUNT"]) == (lab.denied.ipv6, 5432, "postgres", 1)
        assert record["message"].startswith("dropped tcp [")
    finally:
        follower.terminate()
        follower.communicate(timeout=COMMAND_TIMEOUT)
