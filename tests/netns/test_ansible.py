"""The Ansible collection's module and role (hostwall.firewall, built with `make collection`
and installed with ansible-galaxy) through real ansible-playbook runs.

Each run is a subprocess with a local connection; the module runs the real CLI (a
wrapper around ``python -m hostwall``) against the lab's server namespace, so the kernel
is real and the root namespace's firewall is never touched. Nothing is read from or
written to the user's home: HOME, the Ansible config and every Ansible directory point
into tmp_path.
"""

from __future__ import annotations

import copy
import fcntl
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible_support import Run, ansible_environment, hostwall_wrapper, netns_python, prepare_root
from collection_support import Collection
from netns_support import reach, run_nft

from hostwall.lab import Lab

pytestmark = pytest.mark.root

PLAYBOOK_TIMEOUT = 120
REVIEW_BY = "2099-01-01"



def _entry(cidr: str, owner: str) -> dict[str, str]:
    return {"cidr": cidr, "owner": owner, "reason": f"ansible test: {owner}", "review_by": REVIEW_BY}


def allowlist(lab: Lab) -> dict[str, Any]:
    ok = lab.allowed
    return {
        "https": {"allow": [_entry(f"{ok.ipv4}/32", "allowed-v4"), _entry(f"{ok.ipv6}/128", "allowed-v6")]},
        "postgres": {"allow": [_entry(f"{ok.ipv4}/32", "allowed-db")]},
    }


MODULE = ROLE = "hostwall.firewall.hostwall"

# Where the module finds the lab (from the inventory's variables).
LAB_ARGUMENTS = {"netns": "{{ netns }}", "state_dir": "{{ state_dir }}", "hostwall_bin": "{{ hostwall_bin }}"}


def apply_task(**arguments: Any) -> dict[str, Any]:
    return {"name": "hostwall allowlist", MODULE: {
        "services": "{{ allowlist }}", "policy_dir": "{{ policy_dir }}", **LAB_ARGUMENTS,
        "comment": "ansible test", "wait": 5, **arguments}}


@dataclass
class Ansible:
    root: Path
    environment: dict[str, str]
    variables: dict[str, Any]
    runs: int = 0

    def play(self, tasks: list[dict[str, Any]], allow: dict[str, Any], *flags: str,
             roles: tuple[str, ...] = (), extra: dict[str, Any] | None = None) -> Run:
        (self.root / "group_vars" / "all.yml").write_text(
            yaml.safe_dump({**self.variables, "allowlist": allow, **(extra or {})}, sort_keys=False))
        play: dict[str, Any] = {"name": "hostwall", "hosts": "lab", "gather_facts": False, "tasks": tasks}
        if roles:
            play["roles"] = list(roles)
        (self.root / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
        command = [sys.executable, "-m", "ansible.cli.playbook", "-i", str(self.root / "inventory.ini"),
                   str(self.root / "play.yml"), *flags]
        self.runs += 1
        record = self.root / f"record-{self.runs}.jsonl"
        process = subprocess.run(command, capture_output=True, text=True, cwd=self.root, check=False,
                                 env={**self.environment, "HOSTWALL_TEST_RECORD": str(record)},
                                 timeout=PLAYBOOK_TIMEOUT)
        return Run(process, record)

    def apply(self, allow: dict[str, Any], *flags: str, **arguments: Any) -> Run:
        return self.play([apply_task(**arguments)], allow, *flags)


@pytest.fixture
def ansible(lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path,
            installed_collection: Collection) -> Ansible:
    root = tmp_path / "ansible"
    (root / "group_vars").mkdir(parents=True)
    prepare_root(root)
    wrapper = hostwall_wrapper(root)
    # The lab's clients as inventory hosts: a module delegated to them runs inside their
    # namespace (its interpreter enters it), so a probe from them is a real client's.
    clients = {"partner": lab.allowed.namespace, "outsider": lab.denied.namespace}
    (root / "inventory.ini").write_text(
        "[lab]\nlocalhost ansible_connection=local "
        f"ansible_python_interpreter={sys.executable}\n[clients]\n"
        + "".join(f"{name} ansible_connection=local ansible_python_interpreter={netns_python(root, namespace)}\n"
                  for name, namespace in clients.items()))
    environment = ansible_environment(root, installed_collection)
    variables = {"netns": lab.server, "policy_dir": str(policy_dir), "state_dir": str(state_dir),
                 "hostwall_bin": str(wrapper)}
    return Ansible(root, environment, variables)


def kernel_table(lab: Lab) -> Any:
    return json.loads(run_nft(lab.server, "-j", "list", "table", "inet", "hostwall").stdout)


def succeeded(run: Run) -> None:
    assert run.process.returncode == 0, f"stdout: {run.process.stdout}\nstderr: {run.process.stderr}"


def test_playbook_is_declarative_idempotent_and_checkable(
    lab: Lab, policy_dir: Path, state_dir: Path, ansible: Ansible
) -> None:
    # A local file beside the managed one, with a file: list relative to it: the module
    # must merge it (in validation and check mode too) and never touch it.
    local = policy_dir / "00-local.yaml"
    local.write_text(yaml.safe_dump({"services": {"metrics": {
        "ports": [9100], "allow": [{"file": "local-ranges.txt", "owner": "local", "reason": "kept by hand",
                                    "review_by": REVIEW_BY}]}}}))
    (policy_dir / "local-ranges.txt").write_text("# by hand\n10.99.0.0/24\n")
    local_before = local.read_bytes()
    managed = policy_dir / "ansible.yaml"
    first_allowlist = allowlist(lab)

    first = ansible.apply(first_allowlist)
    succeeded(first)
    result = first.result()
    assert (result["changed"], result["kernel_changed"], result["file_changed"]) == (True, True, True), result
    assert (result["applied"], result["generation"], result["pending"]) == (True, 1, None), result
    assert result["method"] in ("full", "delta"), result
    meta = json.loads((state_dir / "generations" / "00000001" / "meta.json").read_text())
    assert meta["message"] == "ansible test", meta
    assert yaml.safe_load(managed.read_text())["services"] == first_allowlist
    assert sorted(p.name for p in policy_dir.iterdir()) == ["00-local.yaml", "ansible.yaml", "local-ranges.txt"]
    opened = {("allowed", 4, "443/tcp"): "open", ("allowed", 6, "443/tcp"): "open",
              ("allowed", 4, "5432/tcp"): "open", ("denied", 4, "443/tcp"): "timeout",
              ("denied", 4, "5432/tcp"): "timeout"}
    assert reach(lab, opened) == opened
    assert "10.99.0.0/24" in run_nft(lab.server, "list", "table", "inet", "hostwall").stdout

    second = ansible.apply(first_allowlist)
    succeeded(second)
    result = second.result()
    assert (result["changed"], result["kernel_changed"], result["file_changed"]) == (False, False, False), result
    assert (result["applied"], result["generation"]) == (False, None), result

    # Check mode with a changed allowlist: reported, diffed, and nothing changes.
    widened = copy.deepcopy(first_allowlist)
    widened["https"]["allow"].append(_entry(f"{lab.denied.ipv4}/32", "denied-now-allowed"))
    del widened["postgres"]
    kernel_before, managed_before = kernel_table(lab), managed.read_bytes()
    checked = ansible.apply(widened, "--check", "--diff")
    succeeded(checked)
    assert "changed: [localhost]" in checked.process.stdout, checked.process.stdout
    assert "changed=1" in checked.process.stdout
    assert f"+https: {lab.denied.ipv4}/32" in checked.process.stdout, checked.process.stdout
    assert f"-postgres: {lab.allowed.ipv4}/32" in checked.process.stdout, checked.process.stdout
    assert '+        owner: "denied-now-allowed"' in checked.process.stdout, checked.process.stdout
    assert kernel_table(lab) == kernel_before
    assert managed.read_bytes() == managed_before
    assert sorted(p.name for p in policy_dir.iterdir()) == ["00-local.yaml", "ansible.yaml", "local-ranges.txt"]
    assert reach(lab, opened) == opened

    # Removing postgres from the vars removes its entry from the kernel: the allowed
    # client loses 5432 and keeps 443.
    narrowed = copy.deepcopy(first_allowlist)
    del narrowed["postgres"]
    removed = ansible.apply(narrowed, "--diff")
    succeeded(removed)
    result = removed.result()
    assert (result["changed"], result["applied"], result["generation"]) == (True, True, 2), result
    assert [(s["name"], s["removed"], s["added"]) for s in result["services"]] == [
        ("postgres", [f"{lab.allowed.ipv4}/32"], [])]
    kernel_diff = result["diff"][-1]
    assert (kernel_diff["before"], kernel_diff["after"]) == (f"postgres: {lab.allowed.ipv4}/32\n", ""), result
    assert "postgres" not in yaml.safe_load(managed.read_text())["services"]
    cut = {("allowed", 4, "5432/tcp"): "timeout", ("allowed", 4, "443/tcp"): "open",
           ("denied", 4, "443/tcp"): "timeout"}
    assert reach(lab, cut) == cut
    assert local.read_bytes() == local_before


def test_confirm_within_then_confirm(lab: Lab, state_dir: Path, ansible: Ansible) -> None:
    tasks = [
        apply_task(confirm_within=60),
        {"name": "confirm", MODULE: {**LAB_ARGUMENTS, "confirm": True}},
        {"name": "confirm again", MODULE: {**LAB_ARGUMENTS, "confirm": True}},
    ]
    run = ansible.play(tasks, allowlist(lab))
    succeeded(run)
    applied, confirmed, again = run.results()
    assert (applied["changed"], applied["generation"]) == (True, 1), applied
    assert applied["pending"]["generation"] == 1, applied
    assert applied["pending"]["revert_to"] is None, applied
    assert (confirmed["changed"], confirmed["confirmed"]) == (True, 1), confirmed
    assert (again["changed"], again["confirmed"]) == (False, None), again
    assert not (state_dir / "pending.json").exists()
    status = subprocess.run([ansible.variables["hostwall_bin"], "--netns", lab.server, "--state-dir",
                             str(state_dir), "status", "--json"], capture_output=True, text=True,
                            timeout=PLAYBOOK_TIMEOUT, check=False)
    document = json.loads(status.stdout)
    assert (status.returncode, document["pending"], document["generation"]) == (0, None, 1), document


def test_failures_report_hostwall_errors_and_keep_the_managed_file(
    lab: Lab, policy_dir: Path, state_dir: Path, ansible: Ansible
) -> None:
    good = allowlist(lab)
    succeeded(ansible.apply(good))
    managed = policy_dir / "ansible.yaml"
    accepted = managed.read_bytes()
    kernel_before = kernel_table(lab)

    def failure(allow: dict[str, Any], **arguments: Any) -> dict[str, Any]:
        run = ansible.apply(allow, **arguments)
        assert run.process.returncode != 0, run.process.stdout
        result = run.result()
        assert result["task_status"] == "failed", result
        return result

    # Invalid: host bits set. hostwall's message names the real file, not the mirror.
    invalid = copy.deepcopy(good)
    invalid["postgres"]["allow"][0]["cidr"] = f"{lab.allowed.ipv4}/24"
    result = failure(invalid)
    assert result["rc"] == 3, result
    assert result["msg"].startswith(f"hostwall: {managed}:"), result
    assert "host bits" in result["msg"] or "/32" in result["msg"], result
    assert "\n" not in result["msg"]

    # Valid, but the apply fails (another process holds hostwall's lock): exit 7, and the
    # previous managed file is put back.
    changed = copy.deepcopy(good)
    del changed["postgres"]
    state_dir.mkdir(exist_ok=True)
    with (state_dir / "lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("4242\n")
        lock.flush()
        result = failure(changed, wait=0)
    assert result["rc"] == 7, result
    assert result["msg"].startswith("hostwall: another hostwall process (PID 4242)"), result
    assert result["managed_file"] == "restored", result
    assert managed.read_bytes() == accepted
    assert kernel_table(lab) == kernel_before
    assert sorted(p.name for p in policy_dir.iterdir()) == ["ansible.yaml"]


def test_role_applies_checks_and_confirms(lab: Lab, policy_dir: Path, state_dir: Path, ansible: Ansible) -> None:
    """The collection's role without its install steps: apply with confirm_within, then
    the handlers reconnect and confirm; a second run changes nothing."""
    role_variables = {
        "hostwall_install": False, "hostwall_agent": False, "hostwall_services": "{{ allowlist }}",
        "hostwall_netns": lab.server, "hostwall_policy_dir": str(policy_dir),
        "hostwall_state_dir": str(state_dir), "hostwall_bin": ansible.variables["hostwall_bin"],
        "hostwall_confirm_within": 60, "hostwall_connectivity_timeout": 10,
        "hostwall_connectivity_checks": [
            {"from": "partner", "host": lab.allowed.server_ipv4, "port": 5432},
            {"from": "outsider", "host": lab.denied.server_ipv4, "port": 443, "expect": "timeout"},
        ],
    }
    run = ansible.play([], allowlist(lab), roles=(ROLE,), extra=role_variables)
    succeeded(run)
    by_name = {name: result for name, result in zip(run.tasks(), run.results(), strict=True)}
    applied = by_name[f"{ROLE} : Load the allowlist (the whole policy, declaratively)"]
    assert (applied["changed"], applied["generation"], applied["pending"]["generation"]) == (True, 1, 1), applied
    confirmed = by_name[f"{ROLE} : Confirm the hostwall change"]
    assert (confirmed["changed"], confirmed["confirmed"]) == (True, 1), confirmed
    assert f"{ROLE} : Open a fresh connection to the host" in by_name
    probes = by_name[f"{ROLE} : Check that the allowed paths still connect (and the others still time out)"]
    assert [(probe["item"]["from"], probe["result"]) for probe in probes["results"]] == [
        ("partner", "open"), ("outsider", "timeout")], probes
    assert not (state_dir / "pending.json").exists()
    opened = {("allowed", 4, "5432/tcp"): "open", ("denied", 4, "443/tcp"): "timeout"}
    assert reach(lab, opened) == opened

    again = ansible.play([], allowlist(lab), roles=(ROLE,), extra=role_variables)
    succeeded(again)
    assert "changed=0" in again.process.stdout, again.process.stdout
    assert "Confirm the hostwall change" not in again.process.stdout
