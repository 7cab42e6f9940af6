"""The collection's rolling change (playbook hostwall.firewall.rollout) on three namespace
servers, each with a partner and an outsider of its own.

The playbook runs for real: every server is a network namespace that the module changes
with --netns, and the probes are delegated to the partner and outsider hosts, whose
modules run inside their client namespaces. A change that locks the partner out must stop
at the first server, which then reverts by itself; the other two are never touched.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible_support import Run, ansible_environment, hostwall_wrapper, netns_python, prepare_root
from collection_support import Collection

from hostwall.lab import Lab, create_lab, probe_tcp

pytestmark = pytest.mark.root

SERVERS = ("server1", "server2", "server3")
PLAYBOOK = "hostwall.firewall.rollout"
PLAYBOOK_TIMEOUT = 180
CONFIRM_WITHIN = 30
REVERT_DEADLINE = 90
REVIEW_BY = "2099-01-01"


def _entry(cidr: str, owner: str) -> dict[str, str]:
    return {"cidr": cidr, "owner": owner, "reason": f"rollout test: {owner}", "review_by": REVIEW_BY}


def policy(partner: str) -> dict[str, Any]:
    return {"https": {"allow": [_entry(f"{partner}/32", "partner")]},
            "postgres": {"allow": [_entry(f"{partner}/32", "partner")]}}


@contextlib.contextmanager
def three_labs() -> Iterator[list[Lab]]:
    labs: list[Lab] = []
    try:
        for _ in SERVERS:
            labs.append(create_lab())
            labs[-1].start_services()
        yield labs
    finally:
        for lab in labs:
            lab.destroy()


class Fleet:
    def __init__(self, root: Path, labs: list[Lab], collection: Collection) -> None:
        self.root, self.labs = root, labs
        prepare_root(root)
        self.hostwall = hostwall_wrapper(root)
        self.environment = ansible_environment(root, collection)
        self.runs = 0
        lines = ["[hostwall]"]
        clients = ["[clients]"]
        host_vars = root / "host_vars"
        host_vars.mkdir()
        for index, (name, lab) in enumerate(zip(SERVERS, labs, strict=True), start=1):
            lines.append(f"{name} ansible_connection=local ansible_python_interpreter={sys.executable}")
            partner, outsider = f"partner{index}", f"outsider{index}"
            for client, namespace in ((partner, lab.allowed.namespace), (outsider, lab.denied.namespace)):
                clients.append(f"{client} ansible_connection=local "
                               f"ansible_python_interpreter={netns_python(root, namespace)}")
            (host_vars / f"{name}.yml").write_text(yaml.safe_dump({
                "hostwall_netns": lab.server,
                "hostwall_policy_dir": str(self.policy_dir(name)),
                "hostwall_state_dir": str(self.state_dir(name)),
                # Each client sees its server at the address of its own link.
                "hostwall_rollout_probes": [
                    {"from": partner, "host": lab.allowed.server_ipv4, "port": 443, "expect": "open"},
                    {"from": partner, "host": lab.allowed.server_ipv4, "port": 5432, "expect": "open"},
                    {"from": outsider, "host": lab.denied.server_ipv4, "port": 443, "expect": "timeout",
                     "timeout": 2},
                ],
            }))
        (root / "inventory.ini").write_text("\n".join([*lines, "", *clients, ""]))

    def policy_dir(self, server: str) -> Path:
        return self.root / "hosts" / server / "policies"

    def state_dir(self, server: str) -> Path:
        return self.root / "hosts" / server / "state"

    def roll(self, services: dict[str, Any], confirm_within: float) -> Run:
        self.runs += 1
        change = self.root / f"change-{self.runs}.yml"
        change.write_text(yaml.safe_dump({
            "hostwall_services": services, "hostwall_confirm_within": confirm_within,
            "hostwall_bin": str(self.hostwall), "hostwall_wait": 10, "hostwall_rollout_become": False,
            "hostwall_message": f"rollout test {self.runs}"}))
        record = self.root / f"record-{self.runs}.jsonl"
        process = subprocess.run(
            [sys.executable, "-m", "ansible.cli.playbook", "-i", str(self.root / "inventory.ini"), PLAYBOOK,
             "-e", f"@{change}"], capture_output=True, text=True, cwd=self.root, check=False,
            env={**self.environment, "HOSTWALL_TEST_RECORD": str(record)}, timeout=PLAYBOOK_TIMEOUT)
        return Run(process, record)

    def status(self, server: str, lab: Lab) -> dict[str, Any]:
        result = subprocess.run([str(self.hostwall), "--netns", lab.server, "--state-dir", str(self.state_dir(server)),
                                 "status", "--json"], capture_output=True, text=True, timeout=60, check=False)
        document: dict[str, Any] = json.loads(result.stdout)
        return document


def reached(lab: Lab) -> tuple[str, str]:
    return (probe_tcp(lab.allowed.namespace, lab.allowed.server_ipv4, 443),
            probe_tcp(lab.denied.namespace, lab.denied.server_ipv4, 443))


def test_a_change_that_locks_the_partner_out_stops_at_the_first_server_which_reverts(
        tmp_path: Path, installed_collection: Collection, privileges: None) -> None:
    with three_labs() as labs:
        fleet = Fleet(tmp_path / "ansible", labs, installed_collection)
        partner = labs[0].allowed.ipv4  # the same address in every lab
        baseline = fleet.roll(policy(partner), confirm_within=60)
        assert baseline.process.returncode == 0, baseline.process.stdout + baseline.process.stderr
        for server, lab in zip(SERVERS, labs, strict=True):
            status = fleet.status(server, lab)
            assert (status["generation"], status["pending"]) == (1, None), (server, status)
            assert reached(lab) == ("open", "timeout"), server
        # One host at a time: each server's apply, probes and confirm before the next apply.
        applied_on = [host for task, host in zip(baseline.tasks(), baseline.hosts(), strict=True)
                      if task.startswith("Apply the change")]
        assert applied_on == list(SERVERS)

        locked_out = policy("10.77.9.9")
        before = {server: (fleet.policy_dir(server) / "ansible.yaml").read_bytes() for server in SERVERS}
        change = fleet.roll(locked_out, confirm_within=CONFIRM_WITHIN)
        assert change.process.returncode != 0, change.process.stdout
        results = list(zip(change.tasks(), change.hosts(), change.results(), strict=True))
        assert [host for task, host, _ in results if task.startswith("Apply the change")] == ["server1"], \
            change.process.stdout
        failed = [(task, result) for task, _, result in results if result["task_status"] == "failed"]
        assert [task for task, _ in failed] == [
            "Probe the host from the partner (must connect) and the outsider (must time out)"], failed
        probes = failed[0][1]["results"]
        assert (probes[0]["item"]["from"], probes[0]["result"]) == ("partner1", "timeout"), probes
        assert not any(task.startswith("Confirm") for task, _, _ in results)

        # server1 got generation 2, was not confirmed and goes back to generation 1 by itself.
        (applied,) = [result for task, _, result in results if task.startswith("Apply the change")]
        assert (applied["generation"], applied["pending"]["revert_to"]) == (2, 1), applied
        deadline = time.monotonic() + REVERT_DEADLINE
        while (first := fleet.status("server1", labs[0]))["pending"] is not None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (first["generation"], first["pending"]) == (1, None), first
        assert reached(labs[0]) == ("open", "timeout")
        # The other two were never touched: their policy, generation and reach are as before.
        for server, lab in zip(SERVERS[1:], labs[1:], strict=True):
            status = fleet.status(server, lab)
            assert (status["generation"], status["pending"]) == (1, None), (server, status)
            assert (fleet.policy_dir(server) / "ansible.yaml").read_bytes() == before[server], server
            assert reached(lab) == ("open", "timeout"), server


def test_a_change_that_reverted_before_its_probes_ended_stops_the_rollout(
        tmp_path: Path, installed_collection: Collection, privileges: None) -> None:
    """confirm_within shorter than the probes: they pass against the old policy, so the
    confirm that finds nothing to confirm must stop the rollout."""
    with three_labs() as labs:
        fleet = Fleet(tmp_path / "ansible", labs, installed_collection)
        baseline = policy(labs[0].allowed.ipv4)
        assert fleet.roll(baseline, confirm_within=60).process.returncode == 0
        before = {server: (fleet.policy_dir(server) / "ansible.yaml").read_bytes() for server in SERVERS}
        widened = copy.deepcopy(baseline)
        widened["https"]["allow"].append(_entry("10.77.9.9/32", "newcomer"))
        run = fleet.roll(widened, confirm_within=1)
        assert run.process.returncode != 0, run.process.stdout
        results = list(zip(run.tasks(), run.hosts(), run.results(), strict=True))
        assert [host for task, host, _ in results if task.startswith("Apply the change")] == ["server1"]
        failed = [(task, result) for task, _, result in results if result["task_status"] == "failed"]
        assert [task for task, _ in failed] == ["Confirm the change on this host"], failed
        assert failed[0][1]["confirmed"] is None, failed
        assert fleet.status("server1", labs[0])["generation"] == 1
        for server, lab in zip(SERVERS[1:], labs[1:], strict=True):
            assert (fleet.policy_dir(server) / "ansible.yaml").read_bytes() == before[server], server
            assert fleet.status(server, lab)["generation"] == 1, server
