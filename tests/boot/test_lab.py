"""`make lab`, `make lab-check`, `make lab-down` for real: the Vagrant lab's hosts as
systemd-nspawn machines (two servers here, as LAB_SERVERS=2), provisioned by
vagrant/playbook.yml over SSH, probed from inside the clients, then removed without a trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import twin

pytestmark = [pytest.mark.root, pytest.mark.slow]

NAME = f"hwlab{os.getpid() % 10_000_000}"


def ssh(lab: twin.Lab, host: str, command: str) -> str:
    result = twin.subprocess.run(lab.ssh_command(lab.host(host), command), capture_output=True, text=True,
                                 timeout=twin.SSH_TIMEOUT, check=False)
    assert result.returncode == 0, f"{command} on {host}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def lab(privileges: None) -> Iterator[twin.Lab]:
    try:
        yield twin.up(NAME, servers=2)
    finally:
        twin.down(NAME)
    assert twin.leftovers(NAME) == []


def test_every_host_is_a_booted_machine_with_sshd(lab: twin.Lab) -> None:
    assert [host.name for host in lab.hosts] == ["server", "server2", "partner", "outsider"]
    for host in lab.hosts:
        shown = ssh(lab, host.name, "cat /proc/1/comm; hostname; systemctl is-active ssh; "
                                    "systemctl is-system-running || true").split()
        assert shown[:3] == ["systemd", host.name, "active"], shown
        assert shown[3] in ("running", "degraded"), shown


def test_playbook_loaded_the_allowlist_on_every_server(lab: twin.Lab) -> None:
    partner = lab.host("partner").address
    for server in lab.servers:
        status = json.loads(ssh(lab, server.name, "hostwall status --json"))
        assert status["generation"] == 1, status
        assert ssh(lab, server.name, "systemctl is-active hostwall nginx postgresql").split() == ["active"] * 3
        policy = ssh(lab, server.name, "cat /etc/hostwall/policies/ansible.yaml")
        assert f"{partner}/32" in policy, policy
        assert lab.host("outsider").address not in policy, policy


def test_check_passes_partner_connects_outsider_times_out(lab: twin.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert twin.check(NAME), capsys.readouterr().out
    table = capsys.readouterr().out.splitlines()[1:]
    assert len(table) == 2 * 2 * len(lab.servers), table


def test_check_fails_when_a_probe_is_not_as_expected(lab: twin.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    ssh(lab, "server2", "systemctl stop nginx")
    try:
        assert not twin.check(NAME)
        unexpected = [line for line in capsys.readouterr().out.splitlines() if "unexpected" in line]
        assert len(unexpected) == 1 and unexpected[0].startswith("partner   server2 "), unexpected
        assert "refused" in unexpected[0], unexpected
    finally:
        ssh(lab, "server2", "systemctl start nginx")


def test_provision_again_in_check_mode_changes_no_allowlist(lab: twin.Lab,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    twin.reprovision(NAME, ("--check", "--diff"))
    output = capsys.readouterr().out
    assert "hostwall kernel: entries added" not in output, output
    for server in lab.servers:
        assert json.loads(ssh(lab, server.name, "hostwall status --json"))["generation"] == 1


def test_up_refuses_a_lab_that_is_already_up(lab: twin.Lab) -> None:
    with pytest.raises(twin.BootError, match="already up"):
        twin.up(NAME, servers=1)
    assert twin.check(NAME)


def test_down_removes_a_half_made_lab(privileges: None) -> None:
    name = f"hwhalf{os.getpid() % 1_000_000}"
    half = twin.Lab(name, twin.plan(name, 1))
    try:
        half.save()
        twin.create_network(half)
        assert len(twin.leftovers(name)) == 1 + len(half.hosts) + 1  # namespaces, and the state directory
    finally:
        twin.down(name)
    assert twin.leftovers(name) == []


def test_a_failed_up_removes_what_it_made(privileges: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Machines booted, then provisioning fails: nothing of the lab is left."""
    name = f"hwfail{os.getpid() % 1_000_000}"
    booted: list[str] = []

    def failing_provision(lab: twin.Lab, arguments: tuple[str, ...] = ()) -> None:
        booted.extend(host.name for host in lab.hosts if host.leader and ssh(lab, host.name, "cat /proc/1/comm")
                      .strip() == "systemd")
        raise twin.BootError("provisioning failed (on purpose)")

    monkeypatch.setattr(twin, "provision", failing_provision)
    try:
        with pytest.raises(twin.BootError, match="on purpose"):
            twin.up(name, servers=1)
        assert booted == ["server", "partner", "outsider"]
        assert twin.leftovers(name) == []
    finally:
        twin.down(name)
