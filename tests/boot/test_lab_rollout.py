"""`make lab-rollout-test`: the collection's rolling change (hostwall.firewall.rollout) on
the lab of three servers (as LAB_SERVERS=3 make lab), over real SSH.

The change locks the partner out. The rollout must stop at the first server (its probe
from the partner fails, so it is never confirmed), that server must go back to its
previous generation by itself, and the other two must keep their policy untouched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
import twin
import yaml

pytestmark = [pytest.mark.root, pytest.mark.slow]

NAME = f"hwroll{os.getpid() % 1_000_000}"
CONFIRM_WITHIN = 30
REVERT_DEADLINE = 120


def ssh(lab: twin.Lab, host: str, command: str) -> str:
    result = twin.subprocess.run(lab.ssh_command(lab.host(host), command), capture_output=True, text=True,
                                 timeout=twin.SSH_TIMEOUT, check=False)
    assert result.returncode == 0, f"{command} on {host}: {result.stderr}"
    return result.stdout


def status(lab: twin.Lab, server: str) -> dict[str, object]:
    document: dict[str, object] = json.loads(ssh(lab, server, "hostwall status --json"))
    return document


def generations(lab: twin.Lab, server: str) -> list[int]:
    return sorted(int(g["generation"]) for g in json.loads(ssh(lab, server, "hostwall generations --json")))


@pytest.fixture(scope="module")
def lab(privileges: None) -> Iterator[twin.Lab]:
    try:
        yield twin.up(NAME, servers=3)
    finally:
        twin.down(NAME)
    assert twin.leftovers(NAME) == []


def test_a_change_that_locks_the_partner_out_stops_at_the_first_server(
        lab: twin.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    servers = [server.name for server in lab.servers]
    assert servers == ["server", "server2", "server3"]
    before = {name: (status(lab, name)["generation"], ssh(lab, name, "cat /etc/hostwall/policies/ansible.yaml"))
              for name in servers}
    assert all(generation == 1 for generation, _ in before.values()), before

    # The lab's policy with every partner entry moved to an address nobody has.
    nobody = f"{twin.NETWORK}.99/32"
    entry = {"cidr": nobody, "owner": "partner", "reason": "rollout test: partner locked out",
             "review_by": "2099-01-01"}
    change = lab.state_dir / "rollout-change.yml"
    change.write_text(yaml.safe_dump({
        "hostwall_services": {"https": {"allow": [entry]}, "postgres": {"allow": [entry]}},
        "hostwall_confirm_within": CONFIRM_WITHIN,
        "hostwall_message": "rollout test: lock the partner out",
    }))
    capsys.readouterr()
    code = twin.run_playbook(lab, "hostwall.firewall.rollout", ("-e", f"@{change}"), "rollout.log")
    output = capsys.readouterr().out
    assert code != 0, output
    # Stopped at the first server: its probe from the partner failed, nothing else ran.
    assert "changed: [server]" in output and "failed: [server -> partner" in output, output
    assert "[server2" not in output and "[server3" not in output, output
    assert "Confirm the change on this host" not in output, output

    # The first server got generation 2 and goes back to generation 1 by itself.
    assert generations(lab, "server") == [1, 2]
    deadline = time.monotonic() + REVERT_DEADLINE
    while (first := status(lab, "server"))["pending"] is not None and time.monotonic() < deadline:
        time.sleep(1)
    assert (first["generation"], first["pending"]) == (1, None), first
    # The other two were never touched.
    for name in servers[1:]:
        assert generations(lab, name) == [1], name
        assert (status(lab, name)["generation"], ssh(lab, name, "cat /etc/hostwall/policies/ansible.yaml")) \
            == before[name], name
    # And the partner reaches every server again; the outsider still times out.
    assert twin.check(NAME), capsys.readouterr().out
