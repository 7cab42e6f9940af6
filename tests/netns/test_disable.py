"""`hostwall disable` against a real kernel: the table goes, status says so, rollback and
apply bring it back, and the agent keeps it away (restart, reload, a table loaded
behind its back) until the next apply. Also apply --check's exit code."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from netns_support import Cli, Nft, output, reach
from test_agent import ALLOWED_ONLY, _policy, _table_exists, harness  # noqa: F401 (fixture)

from hostwall.lab import Lab

pytestmark = pytest.mark.root

OPEN = {("allowed", 4, "5432/tcp"): "open", ("denied", 4, "5432/tcp"): "open"}


def test_disable_then_rollback_then_apply(lab: Lab, policy_dir: Path, nft: Nft, hostwall: Cli) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    assert hostwall("apply", "--check").returncode == 10  # changes pending, like plan
    assert hostwall("apply").returncode == 0
    assert hostwall("apply", "--check").returncode == 0  # nothing left to change

    disabled = hostwall("disable", "-m", "OPS-9")
    assert disabled.returncode == 0, disabled.stderr
    assert "generation 2 removed the hostwall table" in disabled.stdout
    assert not _table_exists(nft)
    assert reach(lab, OPEN) == OPEN
    status = hostwall("status", "--drops", "0")
    assert status.returncode == 0, status.stdout
    assert status.stdout.startswith("disabled: generation 2 removed the hostwall table")
    assert output(hostwall("status", "--json", "--drops", "0"))["disabled"] is True
    assert hostwall("apply", "--check").returncode == 10

    assert hostwall("rollback").returncode == 0
    assert _table_exists(nft)
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    assert hostwall("status", "--drops", "0").returncode == 0

    assert hostwall("disable").returncode == 0
    assert not _table_exists(nft)
    assert hostwall("apply").returncode == 0
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    generations = output(hostwall("generations", "--json"))
    assert [g["disabled"] for g in generations] == [False, True, True, False]


def test_the_agent_keeps_a_disable_until_the_next_apply(
    lab: Lab, policy_dir: Path, nft: Nft, hostwall: Cli, harness: Any  # noqa: F811
) -> None:
    _policy(policy_dir, [f"{lab.allowed.ipv4}/32"])
    agent = harness("--full-check-interval", "1")
    agent.wait_for("READY=1")
    assert _table_exists(nft)

    assert hostwall("disable").returncode == 0
    readies = agent.count("READY=1")
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for("READY=1", occurrence=readies + 1)
    assert any("STATUS=disabled by generation 2: no hostwall table" in m for _, m in agent.messages)
    assert not _table_exists(nft)

    # A table loaded behind the disable is drift, and the agent removes it again.
    nft("add", "table", "inet", "hostwall")
    deadline = time.monotonic() + 8
    while _table_exists(nft) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _table_exists(nft), "the agent left a table that a disable removed"
    assert agent.stop() == 0

    restarted = harness()
    restarted.wait_for("READY=1")
    assert not _table_exists(nft), "a restarted agent loaded the policy although hostwall is disabled"
    assert hostwall("apply").returncode == 0
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    assert restarted.stop() == 0
