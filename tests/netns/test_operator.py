"""The operator's commands against a real kernel: per-entry counters feeding audit's
unused rule (including elements an element delta adds), and status on one screen with
the agent's state and the last drops."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns_support import Cli, CliJson, Journald, Nft, reach, wait_for_records
from test_agent import Harness

from hostwall.drops import MESSAGE_ID_DROP
from hostwall.lab import Lab

pytestmark = pytest.mark.root

DAY = 86400.0


def _write(policy_dir: Path, cidrs: list[tuple[str, str]], *, counters: bool = True) -> None:
    service: dict[str, Any] = {"allow": [{"cidr": cidr, "owner": owner, "reason": "t", "review_by": "2099-01-01"}
                                         for cidr, owner in cidrs]}
    if counters:
        service = {"entry_counters": True, **service}
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump({"services": {"postgres": service}}, sort_keys=False))


def _element_packets(nft: Nft) -> dict[str, int | None]:
    """Each element of postgres_v4 (single addresses: postgres_v4_hosts) and its packet
    counter (None: the element has none)."""
    result: dict[str, int | None] = {}
    for set_name in ("postgres_v4_hosts", "postgres_v4"):
        listing = json.loads(nft("-j", "list", "set", "inet", "hostwall", set_name).stdout)
        body = next(item["set"] for item in listing["nftables"] if "set" in item)
        for element in body.get("elem", []):
            value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
            text = f"{value['prefix']['addr']}/{value['prefix']['len']}" if isinstance(value, dict) else f"{value}/32"
            counter = element["elem"].get("counter") if isinstance(element, dict) and "elem" in element else None
            result[text] = counter["packets"] if counter else None
    return result


def test_entry_counters_in_the_kernel_feed_audits_unused_rule(
    lab: Lab, policy_dir: Path, state_dir: Path, cli_json: CliJson, nft: Nft
) -> None:
    client = f"{lab.allowed.ipv4}/32"
    _write(policy_dir, [(client, "app"), ("10.99.0.0/24", "gone")])
    code, applied = cli_json("apply")
    assert (code, applied["method"]) == (0, "full"), applied

    assert reach(lab, {("allowed", 4, "5432/tcp"): "open"}) == {("allowed", 4, "5432/tcp"): "open"}
    packets = _element_packets(nft)
    assert packets["10.99.0.0/24"] == 0
    assert (packets[client] or 0) > 0, packets

    # An element added by a delta (raw netlink, not nft) gets its own counter from the set.
    _write(policy_dir, [(client, "app"), ("10.99.0.0/24", "gone"), ("10.98.0.0/24", "new")])
    code, applied = cli_json("apply")
    assert (code, applied["method"]) == (0, "delta"), applied
    assert _element_packets(nft)["10.98.0.0/24"] == 0

    # Counting began with the full load; pretend that was 100 days ago.
    current_path = state_dir / "current.json"
    current = json.loads(current_path.read_text())
    current["counting_since"] -= 100 * DAY
    current_path.write_text(json.dumps(current))
    generation_meta = state_dir / "generations" / "00000001" / "meta.json"
    meta = json.loads(generation_meta.read_text())
    meta["created"] -= 100 * DAY
    generation_meta.write_text(json.dumps(meta))

    code, report = cli_json("audit", "--usage", "--unused-days", "90", "--fail-on", "warning")
    assert code == 10, report
    assert report["unused_checked"] is True
    assert [(f["rule"], f["subject"], f["owner"]) for f in report["findings"]] == [
        ("unused", "10.99.0.0/24", "gone")]

    # Without entry counters there is no evidence, and audit says why.
    _write(policy_dir, [(client, "app")], counters=False)
    assert cli_json("apply")[0] == 0
    code, report = cli_json("audit", "--usage")
    assert (code, report["unused_checked"], report["unused_note"]) == (
        0, False, "no service has entry_counters: true")


@pytest.fixture
def agent(lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path, journald: Journald) -> Iterator[Harness]:
    started = Harness(lab, policy_dir, state_dir, tmp_path)
    yield started
    started.close()


def test_status_on_one_screen_with_the_agent_and_the_last_drops(
    lab: Lab, policy_dir: Path, hostwall: Cli, cli_json: CliJson, agent: Harness
) -> None:
    _write(policy_dir, [(f"{lab.allowed.ipv4}/32", "app")], counters=False)
    agent.wait_for("READY=1")
    assert reach(lab, {("denied", 4, "5432/tcp"): "timeout"}) == {("denied", 4, "5432/tcp"): "timeout"}
    wait_for_records(lab.server, lambda r: len(r) > 0, f"MESSAGE_ID={MESSAGE_ID_DROP}")

    deadline = time.monotonic() + 15
    while True:
        code, status = cli_json("status")
        if status["agent"]["state"] == "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 0, status
    assert status["agent"]["state"] == "running"
    assert status["agent"]["pid"] == agent.process.pid
    assert status["agent"]["status"].startswith("generation 1 loaded")
    assert status["last_drops_error"] is None
    assert any(d.get("HOSTWALL_SRC") == lab.denied.ipv4 for d in status["last_drops"]), status["last_drops"]
    [postgres] = [s for s in status["services"] if s["name"] == "postgres"]
    assert postgres["entries"] == 1 and postgres["dropped_packets"] > 0

    text = hostwall("status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "generation 1 loaded (recorded: 1)"
    assert any(line.split()[:4] == ["postgres", "5432/tcp", "drop", "1"] for line in lines), lines
    assert "in sync: the kernel matches what hostwall wrote" in lines
    assert any(line.startswith(f"agent: running: pid {agent.process.pid}, up ") for line in lines), lines
    assert "last drops:" in lines
    assert any(f"dropped tcp {lab.denied.ipv4}:" in line for line in lines), lines

    assert agent.stop() == 0
    code, status = cli_json("status", "--drops", "0")
    assert status["agent"]["state"] == "stopped", status
    assert status["last_drops"] == []
