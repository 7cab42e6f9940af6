"""Sudo delegation end to end: an operator user, created here, runs hostwall through real
sudo with the shipped sudoers drop-in (pointed at this checkout), and gets the firewall
and nothing more.

Everything runs inside a network and mount namespace made for the test (`unshare -n -m`):
the table is loaded there, the drop-in is bind-mounted over /etc/sudoers.d there only,
and policies and state live in a temporary directory, so the host's firewall, sudoers
and /var/lib/hostwall are never touched. The user and group are removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci_gate import skip_or_fail_in_ci
from netns_support import COMMAND_TIMEOUT, Journald

from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_REVERTED

pytestmark = pytest.mark.root

REPOSITORY = Path(__file__).resolve().parents[2]
ENTRY_POINT = Path(os.environ.get("VIRTUAL_ENV", REPOSITORY / ".venv")) / "bin" / "hostwall"
# The operator's SSH session as sshd would describe it: the client 198.51.100.7 reaches
# this host's port 22. The test's netns has no such link; the guard reads the address.
SESSION = "198.51.100.7 50022 192.0.2.1 22"
REVERT_DEADLINE = 90.0  # seconds a reverter gets on a loaded machine; no speed is asserted


@dataclass
class Operator:
    """A user in a group that the adapted drop-in admits, and the namespaces it works in."""

    name: str
    group: str
    holder: subprocess.Popen[bytes]  # keeps the network and mount namespace alive
    top: Path  # 0755: the operator may enter it
    policy_dir: Path
    state_dir: Path
    command: Path  # what the drop-in admits, standing for /usr/local/bin/hostwall

    def enter(self, *command: str) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "-m", "--", *command]

    def sudo(self, *args: str, cwd: Path | None = None, session: str | None = SESSION,
             sudo_options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """`sudo hostwall ARGS` as the operator, from cwd, in an SSH session (or none).

        SSH_CONNECTION is in the environment of sudo itself, as it would be when sudo
        runs from the operator's login shell; sudo does not pass it on to hostwall."""
        environment = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent", "LANG=C.UTF-8",
                       *([f"SSH_CONNECTION={session}"] if session else [])]
        inner = [*environment, "sudo", "-n", *sudo_options, str(self.command), *args]
        command = self.enter("runuser", "-u", self.name, "--", "sh", "-c",
                             'cd "$1" && shift && exec "$@"', "sh", str(cwd or self.top), *inner)
        return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)

    def as_operator(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.enter("runuser", "-u", self.name, "--", *command), capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT, check=False)

    def nft(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.enter("nft", *args), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)

    def loaded_generation(self) -> int | None:
        listing = self.nft("list", "set", "inet", "hostwall", "generation")
        if listing.returncode != 0:
            return None
        marker = listing.stdout.split("elements = {", 1)[1].split("}", 1)[0]
        return int(marker.strip(), 0)  # a mark: nft prints it in hex

    def write_policy(self, services: dict[str, list[str]], ports: dict[str, int] | None = None) -> None:
        document: dict[str, Any] = {"services": {}}
        for name, cidrs in services.items():
            service: dict[str, Any] = {}
            if ports and name in ports:
                service["ports"] = [ports[name]]
            service["allow"] = [{"cidr": cidr, "owner": "ops", "reason": "sudo test", "review_by": "2099-01-01"}
                                for cidr in cidrs]
            document["services"][name] = service
        (self.policy_dir / "site.yaml").write_text(yaml.safe_dump(document, sort_keys=False))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the sudo test needs root (it creates a user and namespaces)"
    tools = ("sudo", "visudo", "runuser", "nsenter", "unshare", "useradd", "groupadd", "logger", "nft")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"the sudo test needs {', '.join(missing)} (scripts/setup.sh installs sudo)"
    if not ENTRY_POINT.is_file():
        return f"no installed entry point at {ENTRY_POINT}"
    return None


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True)


def _drop_in(command: Path, group: str) -> str:
    """units/sudoers.hostwall with the test's command and group, and without a password
    (the test user has none)."""
    text = (REPOSITORY / "units" / "sudoers.hostwall").read_text()
    assert "/usr/local/bin/hostwall" in text and "%hostwall-operators ALL=(root) HOSTWALL_OPS" in text
    text = text.replace("/usr/local/bin/hostwall", str(command))
    return text.replace("%hostwall-operators ALL=(root) HOSTWALL_OPS", f"%{group} ALL=(root) NOPASSWD: HOSTWALL_OPS")


@pytest.fixture(scope="module")
def operator(privileges: None) -> Iterator[Operator]:
    skip_or_fail_in_ci(_missing(), "the sudo delegation test")
    suffix = str(os.getpid())
    name, group = f"hwop{suffix}", f"hwops{suffix}"
    top = Path(tempfile.mkdtemp(prefix="hostwall-sudo-"))
    holder: subprocess.Popen[bytes] | None = None
    created: list[list[str]] = []
    try:
        os.chmod(top, 0o755)
        _run("groupadd", group)
        created.append(["groupdel", group])
        _run("useradd", "--no-create-home", "--no-user-group", "--gid", group, "--shell", "/bin/sh", name)
        created.insert(0, ["userdel", name])
        policy_dir, state_dir, bin_dir, sudoers = (top / "policies", top / "state", top / "bin", top / "sudoers.d")
        for directory in (policy_dir, bin_dir, sudoers):
            directory.mkdir(mode=0o755)
        # Where /usr/local/bin/hostwall would be: the installed entry point, with the
        # test's policy and state directories, which an operator cannot choose.
        command = bin_dir / "hostwall"
        command.write_text(f'#!/bin/sh\nexec {ENTRY_POINT} --policy-dir {policy_dir} --state-dir {state_dir} "$@"\n')
        command.chmod(0o755)
        (sudoers / "hostwall").write_text(_drop_in(command, group))
        (sudoers / "hostwall").chmod(0o440)
        check = subprocess.run(["visudo", "-c", "-f", str(sudoers / "hostwall")], capture_output=True, text=True,
                               check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        # A private network and mount namespace, kept alive by a sleeping process.
        holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sleep", "900"])
        operator = Operator(name, group, holder, top, policy_dir, state_dir, command)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline, "unshare did not create its namespaces"
            time.sleep(0.05)
        _run(*operator.enter("ip", "link", "set", "lo", "up"))
        _run(*operator.enter("mount", "--bind", str(sudoers), "/etc/sudoers.d"))
        if Path("/var/lib/hostwall").is_dir():  # hostwall would not touch it; neither can a mistake here
            _run(*operator.enter("mount", "-t", "tmpfs", "tmpfs", "/var/lib/hostwall"))
        yield operator
    finally:
        if holder is not None:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=COMMAND_TIMEOUT)
        for undo in created:
            subprocess.run(undo, capture_output=True, check=False, timeout=COMMAND_TIMEOUT)
        shutil.rmtree(top, ignore_errors=True)
        Path(f"/run/sudo/ts/{name}").unlink(missing_ok=True)  # sudo's timestamp of the removed user


def _status(operator: Operator) -> dict[str, Any]:
    # Other tests' agents may write many drop records meanwhile: read well back.
    result = operator.sudo("status", "--json", "--drops", "5000")
    assert result.returncode in (0, 10), result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_sudo_gives_the_operator_the_firewall_and_nothing_more(operator: Operator, journald: Journald) -> None:
    since = f"@{int(time.time()) - 1}"  # journal records of this run only (journalctl --since)
    # The drop-in admits the commands, not the global options that would choose paths.
    operator.write_policy({"ssh": ["198.51.100.7/32"], "https": ["203.0.113.10/32"]}, ports={"ssh": 22})
    first = operator.sudo("apply", "-m", "first")
    assert first.returncode == 0, first.stderr
    assert operator.loaded_generation() == 1
    refused = operator.sudo("--state-dir", "/tmp", "apply")
    assert refused.returncode != 0 and operator.loaded_generation() == 1
    assert "not allowed" in refused.stderr or "password is required" in refused.stderr, refused.stderr
    misplaced = operator.sudo("apply", "--state-dir", "/tmp")
    assert misplaced.returncode == 2
    assert "--state-dir is a global option: put it before the command" in misplaced.stderr

    # 5. A ruleset that drops the operator's own session is refused, under sudo too.
    operator.write_policy({"ssh": ["203.0.113.0/24"], "https": ["203.0.113.10/32"]}, ports={"ssh": 22})
    planned = operator.sudo("plan")
    assert planned.returncode == 10 and "apply would refuse this policy" in planned.stderr, planned.stderr
    locked = operator.sudo("apply", "-m", "lock me out")
    assert locked.returncode == 3, locked.stderr
    assert "198.51.100.7" in locked.stderr and "port 22" in locked.stderr and "--allow-lockout" in locked.stderr
    assert operator.loaded_generation() == 1
    outside = operator.sudo("apply", "-m", "from a console", session=None)  # no SSH session to lose
    assert outside.returncode == 0, outside.stderr
    assert operator.loaded_generation() == 2
    operator.write_policy({"ssh": ["198.51.100.7/32"], "https": ["203.0.113.10/32"]}, ports={"ssh": 22})
    assert operator.sudo("apply", "-m", "back").returncode == 0
    assert operator.loaded_generation() == 3
    back_to_two = operator.sudo("rollback", "--to", "2")
    assert back_to_two.returncode == 3 and "198.51.100.7" in back_to_two.stderr, back_to_two.stderr
    assert operator.loaded_generation() == 3
    anyway = operator.sudo("rollback", "--to", "2", "--allow-lockout")
    assert anyway.returncode == 0, anyway.stderr
    assert operator.loaded_generation() == 2
    assert operator.sudo("apply", "-m", "again").returncode == 0
    assert operator.loaded_generation() == 4

    # 4. Confirmation windows are finite and bounded; nothing is loaded otherwise.
    operator.write_policy({"ssh": ["198.51.100.7/32"], "https": ["203.0.113.11/32"]}, ports={"ssh": 22})
    for window in ("nan", "inf", "1e300", "0.5", "86401"):
        bad = operator.sudo("apply", "-m", "x", "--confirm-within", window)
        assert bad.returncode == 2, (window, bad.stderr)
        assert operator.loaded_generation() == 4
    pending_file = operator.state_dir / "pending.json"
    pending_file.write_text('{"generation": 4, "revert_to": 3, "deadline": NaN}')
    damaged = operator.sudo("status")
    assert damaged.returncode == 6, damaged.stdout + damaged.stderr
    assert "pending.json" in damaged.stderr and "Traceback" not in damaged.stderr
    pending_file.unlink()

    # 3. A message is one line of plain text, of bounded length.
    for message in ("ok\n*  99  2026-01-01 00:00Z  root  0  forged", "\x1b]0;owned\x07", "m" * 501):
        bad = operator.sudo("apply", "-m", message)
        assert bad.returncode == 2, (message, bad.stderr)
    assert operator.loaded_generation() == 4

    # 1. Code planted in the operator's working directory never runs as root, and the
    # real reverter rolls the unconfirmed change back.
    planted = operator.top / "work"
    (planted / "hostwall").mkdir(parents=True)
    marker = operator.top / "planted-code-ran"
    for module in ("__init__.py", "__main__.py"):
        (planted / "hostwall" / module).write_text(f"open({str(marker)!r}, 'a').write('{module} ran\\n')\n")
    shutil.chown(planted, operator.name)
    unconfirmed = operator.sudo("apply", "-m", "unconfirmed", "--confirm-within", "2", cwd=planted)
    assert unconfirmed.returncode == 0, unconfirmed.stderr
    assert operator.loaded_generation() == 5
    deadline = time.monotonic() + REVERT_DEADLINE
    while operator.loaded_generation() != 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert operator.loaded_generation() == 4, "the reverter did not roll the unconfirmed change back"
    assert not marker.exists(), marker.read_text()

    # 6. ... and says so: status and the journal.
    deadline = time.monotonic() + REVERT_DEADLINE
    while (reverted := _status(operator)["reverted"]) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert reverted is not None
    assert (reverted["generation"], reverted["revert_to"], reverted["by"]) == (5, 4, "reverter")
    assert "not confirmed by" in reverted["reason"]
    shown = operator.sudo("status")
    assert "reverted at" in shown.stdout and "generation 5 rolled back to generation 4" in shown.stdout
    matches = (f"MESSAGE_ID={MESSAGE_ID_REVERTED}", "HOSTWALL_GENERATION=5", "HOSTWALL_REVERTED_BY=reverter")
    assert _wait_for_journal(since, *matches), "no journal record of the rollback"
    records = _journal(since, *matches)
    assert any(r.get("HOSTWALL_REVERT_TO") == "4" and r.get("_UID") == "0" for r in records), records

    # 2. Drop records count only when root wrote them: a forged one from the operator
    # is not shown, a real one is.
    forged = _forge(operator)
    assert forged.returncode == 0, forged.stderr
    from systemd import journal

    journal.send(MESSAGE="dropped tcp 198.51.100.99:1 -> 192.0.2.1:443 service=https", MESSAGE_ID=MESSAGE_ID_DROP,
                 PRIORITY="5", SYSLOG_IDENTIFIER="hostwall", HOSTWALL_SRC="198.51.100.99", HOSTWALL_SERVICE="https",
                 HOSTWALL_DPORT="443", HOSTWALL_PROTO="tcp")
    assert _wait_for_journal(since, f"MESSAGE_ID={MESSAGE_ID_DROP}", f"HOSTWALL_SRC={FORGED_SOURCE}")
    assert _wait_for_journal(since, f"MESSAGE_ID={MESSAGE_ID_DROP}", "HOSTWALL_SRC=198.51.100.99")
    sources = [drop.get("HOSTWALL_SRC") for drop in _status(operator)["last_drops"]]
    assert "198.51.100.99" in sources, sources
    assert "198.51.100.66" not in sources, sources


FORGED_SOURCE = "198.51.100.66"


def _forge(operator: Operator) -> subprocess.CompletedProcess[str]:
    record = "\n".join([
        f"MESSAGE=dropped tcp {FORGED_SOURCE}:1 -> 192.0.2.1:443 service=https", f"MESSAGE_ID={MESSAGE_ID_DROP}",
        "PRIORITY=5", "SYSLOG_IDENTIFIER=hostwall", f"HOSTWALL_SRC={FORGED_SOURCE}", "HOSTWALL_SERVICE=https",
        "HOSTWALL_DPORT=443", "HOSTWALL_PROTO=tcp",
    ])
    source = operator.top / "forged-record"
    source.write_text(record + "\n")
    source.chmod(0o644)
    return operator.as_operator("logger", f"--journald={source}")


def _journal(since: str, *matches: str) -> list[dict[str, Any]]:
    result = subprocess.run(["journalctl", "-o", "json", "--no-pager", f"--since={since}", *matches],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _wait_for_journal(since: str, *matches: str) -> bool:
    deadline = time.monotonic() + REVERT_DEADLINE
    while not _journal(since, *matches):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True
