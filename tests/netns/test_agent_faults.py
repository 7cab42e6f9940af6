"""The agent under abuse: SIGHUP storms while an editor replaces the policy, journald
gone during reloads, a broken NFLOG socket, and memory over a long run of drops and
reloads.

Whatever happens, the kernel holds a generation that some valid policy produced, the
agent keeps answering signals, and each recorded generation's policy files compile
to exactly the ruleset recorded with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_doubles import RecordingSink as _Records
from agent_doubles import SilentNotifier as _Notes
from netns_support import Cli, Journald, Nft, send_udp
from test_agent import harness  # noqa: F401  (the fixture that starts the agent like systemd)

from hostwall.agent import Agent, DropStreamer, InterfaceNames
from hostwall.compile import compile_policy
from hostwall.drops import DropReporter, FloodControl
from hostwall.engine import Engine
from hostwall.lab import Lab, probe_tcp
from hostwall.nflog import NflogReader, NflogSettings
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.state import StateDir

pytestmark = pytest.mark.root


def _document(cidrs: list[str], **settings: int) -> str:
    allow = [{"cidr": c, "owner": "t", "reason": "t", "review_by": "2099-01-01"} for c in cidrs]
    document: dict[str, Any] = {"services": {"https": {"allow": allow}}}
    if settings:
        document["settings"] = settings
    return yaml.safe_dump(document)


def _replace_like_an_editor(policy_dir: Path, text: str) -> None:
    temporary = policy_dir / ".policy.yaml.swp"
    temporary.write_text(text)
    os.rename(temporary, policy_dir / "policy.yaml")


def _replace_the_directory(policy_dir: Path, text: str) -> None:
    """mv policies policies.old; mv policies.new policies: for a moment there is none."""
    new, old = policy_dir.with_name("policies.new"), policy_dir.with_name("policies.old")
    new.mkdir()
    (new / "policy.yaml").write_text(text)
    os.rename(policy_dir, old)
    os.rename(new, policy_dir)
    shutil.rmtree(old)


def _settled(hostwall: Cli, seconds: float = 30.0) -> bool:
    """Whether the kernel comes to hold the policy on disk (plan: no changes) in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if hostwall("plan").returncode == 0:
            return True
        time.sleep(0.3)
    return False


def _generations_match_their_policies(state_dir: Path) -> list[str]:
    state = StateDir(state_dir)
    problems = []
    for generation in state.generations():
        sources = generation.path / "policy"
        if not any(sources.iterdir()):
            continue  # fail closed: compiled from no file
        digest = compile_policy(load_policy(sources)).digest
        if digest != generation.meta.digest:
            problems.append(f"generation {generation.meta.number}: its policy files compile to another ruleset")
    return problems


def test_a_sighup_storm_while_the_policy_is_replaced_keeps_a_good_generation(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, harness: Any,  # noqa: F811
) -> None:
    (policy_dir / "policy.yaml").write_text(_document([f"{lab.allowed.ipv4}/32"]))
    agent = harness()
    agent.wait_for("READY=1")

    finished = threading.Event()

    def churn() -> None:
        for round_ in range(400):  # bounded; stops earlier when the storm is over
            if finished.is_set():
                return
            if round_ % 5 == 4:
                text = "services:\n  https:\n    allow:\n      - cidr: 10.0.0.1/8\n"  # invalid: host bits
            else:
                text = _document([f"192.0.2.{round_ % 250}/32", f"2001:db8::{round_:x}/128"])
            if round_ % 40 == 39:
                _replace_the_directory(policy_dir, text)
            else:
                _replace_like_an_editor(policy_dir, text)
            time.sleep(0.002)

    editor = threading.Thread(target=churn)
    editor.start()
    started = time.monotonic()
    try:
        for _ in range(300):
            os.kill(agent.process.pid, signal.SIGHUP)
            time.sleep(0.002)
    finally:
        finished.set()
        editor.join(timeout=30)
    assert time.monotonic() - started < 3.0, "the storm itself took too long to send"
    assert agent.process.poll() is None, "the agent died in the storm"

    # Still responsive: one more change is picked up promptly.
    (policy_dir / "policy.yaml").write_text(_document([f"{lab.allowed.ipv4}/32", "198.51.100.0/24"]))
    readies = agent.count("READY=1")
    os.kill(agent.process.pid, signal.SIGHUP)
    agent.wait_for("READY=1", seconds=30, occurrence=readies + 1)
    assert _settled(hostwall), "the kernel never came to hold the final policy"
    assert hostwall("status").returncode == 0
    assert _generations_match_their_policies(state_dir) == []
    assert agent.stop() == 0


def test_a_corrupt_state_file_does_not_stop_the_agent(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, nft: Nft, harness: Any,  # noqa: F811
) -> None:
    (policy_dir / "policy.yaml").write_text(_document([f"{lab.allowed.ipv4}/32"]))
    agent = harness()
    agent.wait_for("READY=1")
    kernel = nft("list", "table", "inet", "hostwall").stdout
    current = (state_dir / "current.json").read_bytes()

    for name in ("current.json", "pending.json"):
        (state_dir / name).write_bytes(b'{"generation": ')  # truncated
        (policy_dir / "policy.yaml").write_text(_document(["192.0.2.0/24"]))
        readies = agent.count("READY=1")
        os.kill(agent.process.pid, signal.SIGHUP)
        agent.wait_for("READY=1", seconds=20, occurrence=readies + 1)
        agent.collect(0.5)  # several ticks, each of which reads the state
        assert agent.process.poll() is None, f"a corrupt {name} stopped the agent"
        assert nft("list", "table", "inet", "hostwall").stdout == kernel, "the kernel changed on a state error"
        (state_dir / name).unlink()
        (state_dir / "current.json").write_bytes(current)

    # Repaired: the next reload applies the policy on disk.
    readies = agent.count("READY=1")
    os.kill(agent.process.pid, signal.SIGHUP)
    agent.wait_for("READY=1", seconds=20, occurrence=readies + 1)
    assert _settled(hostwall)
    assert agent.stop() == 0


# The agent runs in a mount namespace of its own where journald's socket directory is an
# empty tmpfs: journald is gone for it alone, and the machine's journald is left alone.
WITHOUT_JOURNALD = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs journald-gone /run/systemd/journal && exec "$@"', "sh")


def test_reloads_while_journald_is_gone(
    lab: Lab, policy_dir: Path, hostwall: Cli, harness: Any,  # noqa: F811
) -> None:
    (policy_dir / "policy.yaml").write_text(_document([f"{lab.allowed.ipv4}/32"]))
    agent = harness(wrapper=WITHOUT_JOURNALD)
    agent.wait_for("READY=1")
    for round_, cidr in enumerate(("192.0.2.0/24", "not a cidr", "198.51.100.0/24")):
        (policy_dir / "policy.yaml").write_text(_document([cidr]))
        readies = agent.count("READY=1")
        os.kill(agent.process.pid, signal.SIGHUP)
        agent.wait_for("READY=1", seconds=20, occurrence=readies + 1)
        assert agent.process.poll() is None, f"round {round_}: the agent died without journald"
    assert _settled(hostwall)
    assert hostwall("status").returncode == 0
    agent.process.send_signal(signal.SIGTERM)
    _, stderr = agent.process.communicate(timeout=30)
    assert agent.process.returncode == 0, stderr
    # What would have gone to the journal went to stderr, the invalid policy included.
    assert "policy invalid on reload" in stderr, stderr


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_agent_memory_stays_flat_over_drops_and_reloads(
    lab: Lab, policy_dir: Path, hostwall: Cli, harness: Any, journald: Journald,  # noqa: F811
) -> None:
    # A high log rate, so that the kernel hands most drops to the agent.
    many = [f"10.{50 + i // 250}.{i % 250}.0/24" for i in range(2000)]
    (policy_dir / "policy.yaml").write_text(_document(many, log_rate=100000, log_burst=100000))
    agent = harness()
    agent.wait_for("READY=1")
    pid = agent.process.pid
    samples = []
    deadline = time.monotonic() + 90
    for round_ in range(40):
        assert time.monotonic() < deadline, "the run took too long"
        send_udp(lab.denied.namespace, lab.denied.server_ipv4, 443, 300)
        send_udp(lab.denied.namespace, lab.denied.server_ipv6, 443, 100)
        changed = [*many[round_ % 7:], f"192.0.2.{round_}/32"]
        (policy_dir / "policy.yaml").write_text(_document(changed, log_rate=100000, log_burst=100000))
        readies = agent.count("READY=1")
        os.kill(pid, signal.SIGHUP)
        agent.wait_for("READY=1", seconds=30, occurrence=readies + 1)
        samples.append(_rss_kib(pid))
    warm = max(samples[5:10])
    assert agent.process.poll() is None
    # 40 rounds of 400 drops and a reload of 2000 entries: a leak of even one record or
    # one parsed policy per round would add megabytes.
    assert max(samples[10:]) - warm < 8 * 1024, f"RSS grew from {warm} KiB: {samples}"
    assert max(samples) < 200 * 1024, samples
    assert agent.stop() == 0




def test_a_broken_nflog_socket_is_recorded_and_replaced(
    lab: Lab, policy_dir: Path, state_dir: Path
) -> None:
    """The agent's NFLOG socket fails under it (its descriptor is closed): the agent
    records the failure, keeps running, binds a new socket and logs the next drops."""
    (policy_dir / "policy.yaml").write_text(_document([f"{lab.allowed.ipv4}/32"]))
    backend = NftBackend(lab.server)
    reader = NflogReader(NflogSettings(group=100), lab.server)
    sink = _Records()
    streamer = DropStreamer(reader, sink, DropReporter(FloodControl(), time.monotonic), InterfaceNames(lab.server),
                            lambda: None)
    agent = Agent(Engine(backend, StateDir(state_dir)), StateDir(state_dir), lambda: load_policy(policy_dir),
                  _Notes(), sink, streamer=streamer)
    try:
        agent.start()
        os.close(reader.fileno())  # the socket breaks under the reader
        agent.tick(0.1)
        faults = [r.message for r in sink.records if "drop logs failed" in r.message]
        assert faults and "reading NFLOG failed" in faults[0], [r.message for r in sink.records]

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert probe_tcp(lab.denied.namespace, lab.denied.server_ipv4, 5432, 0.3) == "timeout"
            agent.tick(0.3)
            if any(r.fields.get("HOSTWALL_SRC") == lab.denied.ipv4 for r in sink.records):
                break
        drops = [r for r in sink.records if r.fields.get("HOSTWALL_SRC") == lab.denied.ipv4]
        assert drops, "no drop was logged after the socket was replaced"
    finally:
        agent.stop()
        reader.close()
        backend.close()
