"""What keeps sudo delegation narrow and an operator connected (issue 16), without root:
the lock-out check and how the SSH session is found, bounded confirmation windows and
messages, escaped output, trusted journal records, the rollback marker, read-only
commands, and global options written after the command. tests/netns/test_sudo.py runs
the same through real sudo."""

from __future__ import annotations

import inspect
import io
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from test_catalog import sections

from hostwall.cli import main
from hostwall.cli.common import CONFIRM_WITHIN_MAX, MESSAGE_MAX, reverter_command, spawn_reverter
from hostwall.cli.kernel import reverted_text
from hostwall.compile import compile_policy
from hostwall.drops import MESSAGE_ID_REVERTED, reverted_record
from hostwall.engine import Engine
from hostwall.errors import StateError
from hostwall.fake import FakeBackend
from hostwall.journal import _trusted
from hostwall.lockout import SshSession, WouldLockOut, blocking_service, parse_ssh_connection, refuse_lockout
from hostwall.output import Output
from hostwall.policy import load_policy
from hostwall.ruleset import Ruleset
from hostwall.session import find_ssh_session
from hostwall.state import Pending, StateDir, note_reverted, reverted
from hostwall.text import printable

NOW = 1_800_000_000.0
META = "        owner: ops\n        reason: test\n        review_by: 2099-01-01\n"


def policy_text(ssh: list[str], *, expires: str | None = None) -> str:
    extra = f"        expires: {expires}\n" if expires else ""
    entries = "".join(f"      - cidr: {cidr}\n{META}{extra}" for cidr in ssh)
    return ("services:\n  ssh:\n    ports: [22, \"2200-2299\"]\n    allow:\n" + entries
            + "  https:\n    allow:\n      - cidr: 198.51.100.7/32\n" + META)


def ruleset(tmp_path: Path, ssh: list[str], **kwargs: str) -> Ruleset:
    (tmp_path / "p.yaml").write_text(policy_text(ssh, **kwargs))
    return compile_policy(load_policy(tmp_path / "p.yaml"))


def session(text: str = "198.51.100.7 50022 192.0.2.1 22") -> SshSession:
    parsed = parse_ssh_connection(text, "test")
    assert parsed is not None
    return parsed


# --- 5. the lock-out check ------------------------------------------------------------------


def test_a_session_the_ruleset_admits_is_not_blocked(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, ["198.51.100.0/24", "203.0.113.9/32"])
    assert blocking_service(rules, session(), NOW) is None
    assert blocking_service(rules, session("203.0.113.9 1 192.0.2.1 22"), NOW) is None


def test_a_session_outside_the_allowlist_of_its_port_is_blocked(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, ["203.0.113.0/24", "2001:db8::/32"])
    assert blocking_service(rules, session(), NOW) == "ssh"
    assert blocking_service(rules, session("198.51.100.7 1 192.0.2.1 2250"), NOW) == "ssh"  # in the range
    assert blocking_service(rules, session("2001:db9::1 1 2001:db8::5 22"), NOW) == "ssh"
    assert blocking_service(rules, session("2001:db8:5::1 1 2001:db8::5 22"), NOW) is None
    # A port no service protects, and loopback, are never dropped.
    assert blocking_service(rules, session("198.51.100.7 1 192.0.2.1 2222"), NOW) == "ssh"
    assert blocking_service(rules, session("198.51.100.7 1 192.0.2.1 2300"), NOW) is None
    assert blocking_service(rules, session("127.0.0.1 1 127.0.0.1 22"), NOW) is None


def test_an_ipv4_client_on_a_dual_stack_socket_is_checked_as_ipv4(tmp_path: Path) -> None:
    parsed = session("::ffff:198.51.100.7 50022 ::ffff:192.0.2.1 22")
    assert parsed.client == ipaddress.IPv4Address("198.51.100.7")
    assert blocking_service(ruleset(tmp_path, ["198.51.100.7/32"]), parsed, NOW) is None
    assert blocking_service(ruleset(tmp_path, ["203.0.113.0/24"]), parsed, NOW) == "ssh"


def test_an_entry_that_has_expired_admits_nobody(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, ["198.51.100.7/32"], expires="2099-01-01T00:00:00Z")
    assert blocking_service(rules, session(), NOW) is None
    assert blocking_service(rules, session(), 4_200_000_000.0) == "ssh"  # after 2099


def test_the_refusal_names_the_session_the_port_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(WouldLockOut) as refused:
        refuse_lockout(ruleset(tmp_path, ["203.0.113.0/24"]), session(), NOW, "apply")
    message = str(refused.value)
    assert refused.value.exit_code == 3
    assert "198.51.100.7:50022 -> port 22" in message and "service ssh" in message
    assert "198.51.100.7/32" in message and "--allow-lockout" in message
    refuse_lockout(ruleset(tmp_path, ["203.0.113.0/24"]), None, NOW, "apply")  # no session: nothing to lose


@pytest.mark.parametrize("text", ["", "198.51.100.7 22", "a b c d", "198.51.100.7 0 192.0.2.1 22",
                                  "198.51.100.7 1 192.0.2.1 70000"])
def test_a_malformed_ssh_connection_is_no_session(text: str) -> None:
    assert parse_ssh_connection(text) is None


def test_the_engine_loads_nothing_the_guard_refuses(tmp_path: Path) -> None:
    backend = FakeBackend()
    engine = Engine(backend, StateDir(tmp_path / "state"), clock=lambda: NOW)
    (tmp_path / "p.yaml").write_text(policy_text(["203.0.113.0/24"]))
    policy = load_policy(tmp_path / "p.yaml")

    def guard(rules: Ruleset) -> None:
        refuse_lockout(rules, session(), NOW, "apply")

    with pytest.raises(WouldLockOut):
        engine.apply(policy, user="op", message="", guard=guard)
    assert backend.read_table(elements=False) is None
    assert StateDir(tmp_path / "state").numbers() == []
    applied = engine.apply(policy, user="op", message="", guard=None)
    assert applied.applied and backend.read_table(elements=False) is not None
    with pytest.raises(WouldLockOut):
        engine.rollback(applied.generation, guard=guard)


# --- 5. finding the session under sudo --------------------------------------------------------


def fake_process(proc: Path, pid: int, parent: int, comm: str, environ: dict[str, str]) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    # The name is in parentheses and may hold both spaces and parentheses.
    (directory / "stat").write_text(f"{pid} ({comm}) S {parent} {pid} {pid} 0 -1 4194560 0 0\n")
    (directory / "comm").write_text(comm + "\n")
    (directory / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))


def test_under_sudo_the_session_is_found_in_an_ancestor(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 100, 1, "sshd", {})
    fake_process(proc, 200, 100, "bash", {"SSH_CONNECTION": "198.51.100.7 50022 192.0.2.1 22"})
    fake_process(proc, 300, 200, "sudo", {"SSH_CONNECTION": "203.0.113.1 40000 192.0.2.1 2222"})
    fake_process(proc, 301, 300, "sudo (x) y", {})
    fake_process(proc, 400, 301, "hostwall", {"PATH": "/usr/bin"})

    found = find_ssh_session(400, proc, environ={})
    assert found is not None
    # The nearest holder wins: sudo's copy, as the shell that started it passed it on.
    assert (str(found.client), found.server_port) == ("203.0.113.1", 2222)
    assert "pid 300 (sudo)" in found.found_in
    assert find_ssh_session(400, proc, environ={"SSH_CONNECTION": "198.51.100.9 1 192.0.2.1 22"}).client == \
        ipaddress.IPv4Address("198.51.100.9")  # type: ignore[union-attr]


def test_without_ssh_connection_the_session_is_read_from_sshds_socket(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            # This process stands for sshd: it holds both ends of an established connection.
            proc = tmp_path / "proc"
            fake_process(proc, 400, 401, "hostwall", {})
            fake_process(proc, 401, 402, "bash", {"HOME": "/root"})
            fake_process(proc, 402, 1, "sshd", {})
            for name in ("fd", "net"):
                (proc / "402" / name).symlink_to(Path("/proc") / str(os.getpid()) / name)
            found = find_ssh_session(400, proc, environ={})
            ends = {client.getsockname()[1], accepted.getsockname()[1]}
            assert found is not None and "socket of sshd" in found.found_in
            assert str(found.client) == "127.0.0.1" and {found.client_port, found.server_port} == ends


def test_no_session_without_ssh_and_a_cycle_ends_the_search(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 10, 11, "a", {})
    fake_process(proc, 11, 10, "b", {})
    assert find_ssh_session(10, proc, environ={}) is None
    assert find_ssh_session(999, proc, environ={}) is None  # a process that is gone


# --- 1. the reverter runs the installed code only ----------------------------------------------


def test_the_reverter_is_an_isolated_interpreter_with_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     ) -> None:
    monkeypatch.chdir(tmp_path)
    command = reverter_command(Path("state"), "lab", 7)
    assert command[:4] == [sys.executable, "-I", "-m", "hostwall"]
    assert command[4:6] == ["--state-dir", str(tmp_path / "state")]
    assert command[-4:] == ["--netns", "lab", "revert-unconfirmed", "7"]


def test_code_planted_in_the_working_directory_does_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "cwd"
    (planted / "hostwall").mkdir(parents=True)
    marker = tmp_path / "ran"
    for module in ("__init__.py", "__main__.py"):
        (planted / "hostwall" / module).write_text(f"open({str(marker)!r}, 'a').write('{module}')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    # No pending change: the reverter starts, says so, and has nothing to wait for.
    spawn_reverter(Pending(1, None, NOW), tmp_path / "state", None)
    assert not marker.exists()


def test_a_reverter_that_cannot_start_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 to start without hostwall")
    monkeypatch.setattr(sys, "executable", python)  # an interpreter that has no hostwall installed
    with pytest.raises(StateError, match="reverter did not start"):
        spawn_reverter(Pending(1, None, NOW), tmp_path / "state", None)


# --- 4, 3, 8. what the command line accepts ----------------------------------------------------


def invoke(tmp_path: Path, *args: str) -> Result:
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    else:
        runner = CliRunner()
    return runner.invoke(main, list(args), env={"HOSTWALL_NETNS": None, "HOSTWALL_POLICY_DIR": None,
                                                "HOSTWALL_STATE_DIR": str(tmp_path / "state")})


@pytest.mark.parametrize("window", ["nan", "inf", "-inf", "1e300", "0", "0.5", str(CONFIRM_WITHIN_MAX + 1)])
def test_a_confirmation_window_is_finite_and_bounded(tmp_path: Path, window: str) -> None:
    for command in ("apply", "rollback"):
        result = invoke(tmp_path, command, "--confirm-within", window)
        assert result.exit_code == 2, result.output
        assert "between 1 and 86400 seconds" in result.stderr or "not a valid float" in result.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("message", ["one\ntwo", "a\rb", "\x1b[2J", "\x1b]0;title\x07", "tab\there",
                                     "rtl\u202eoverride", "x" * (MESSAGE_MAX + 1)])
def test_a_message_is_one_line_of_plain_text(tmp_path: Path, message: str) -> None:
    result = invoke(tmp_path, "apply", "-m", message)
    assert result.exit_code == 2, result.output
    assert "--message" in result.stderr


@pytest.mark.parametrize(("args", "option"), [
    (["apply", "--netns", "x"], "--netns"), (["status", "--state-dir=/tmp"], "--state-dir"),
    (["validate", "--policy-dir", "/tmp"], "--policy-dir"), (["plan", "-q"], "-q"),
    (["rollback", "--keep-generations", "3"], "--keep-generations"),
])
def test_a_global_option_after_the_command_says_where_it_goes(tmp_path: Path, args: list[str], option: str) -> None:
    result = invoke(tmp_path, *args)
    assert result.exit_code == 2
    assert f"{option} is a global option: put it before the command" in result.stderr
    assert "No such option" not in result.stderr
    # Any other unknown option keeps click's own message.
    other = invoke(tmp_path, "apply", "--no-such-thing")
    assert other.exit_code == 2 and "No such option" in other.stderr


# --- 3. escaped output -----------------------------------------------------------------------


def test_control_characters_are_escaped_and_other_text_kept() -> None:
    assert printable("partner-b café 日本") == "partner-b café 日本"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x1b]0;x\x07\x9b") == "\\x1b]0;x\\x07\\x9b"
    assert printable("\u202eevil\u2028") == "\\u202eevil\\u2028"


@pytest.mark.parametrize("terminal", [True, False])
def test_data_in_tables_and_lines_is_never_markup_nor_control(terminal: bool) -> None:
    stream = io.StringIO()
    out = Output(stream=stream, terminal=terminal)
    out.table(["owner", "reason"], [["[bold red]boss[/]", "\x1b[31mred\x1b[0m\nforged  row"]], styles=["ok"])
    out.line("[link=http://example.invalid]x[/link] \x1b]8;;x\x07", style="warning")
    text = stream.getvalue()
    assert "[bold red]boss[/]" in text and "[link=http://example.invalid]" in text
    assert "\\x1b[31mred" in text and "\\nforged" in text and "\\x1b]8;;x\\x07" in text
    without_styles = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the colours hostwall itself adds
    assert "\x1b" not in without_styles and "\x07" not in text
    assert len(without_styles.splitlines()) == (len(text.splitlines())) and "\nforged" not in text


def test_a_policy_value_with_escapes_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        'services:\n  https:\n    allow:\n      - cidr: 198.51.100.7/32\n        owner: "evil\\e[2J\\nx"\n'
        "        reason: r\n        review_by: 2099-01-01\n")
    result = invoke(tmp_path, "--policy-dir", str(tmp_path / "p.yaml"), "owners")
    assert result.exit_code == 0, result.output
    assert "evil\\x1b[2J\\nx" in result.stdout and "\x1b" not in result.stdout


# --- 2. trusted journal records --------------------------------------------------------------


@pytest.mark.parametrize(("fields", "trusted"), [
    ({"_UID": 0, "_TRANSPORT": "journal"}, True),
    ({"_UID": 1000, "_TRANSPORT": "journal"}, False),  # logger --journald as a user
    ({"_UID": 0, "_TRANSPORT": "syslog"}, False),  # logger -t hostwall: free text to /dev/log
    ({"_UID": 0, "_TRANSPORT": "stdout"}, False),
    ({"_TRANSPORT": "journal"}, False),
])
def test_only_records_root_sent_natively_are_trusted(fields: dict[str, object], trusted: bool) -> None:
    assert _trusted({"SYSLOG_IDENTIFIER": "hostwall", **fields}) is trusted


# --- 6. a rollback for want of confirmation is recorded and shown ------------------------------


def test_the_rollback_marker_says_when_to_what_and_why(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    assert reverted(state) is None
    note_reverted(state, Pending(5, 4, NOW - 10), at=NOW, reason="not confirmed by 2027-01-15T08:00:00Z",
                  by="reverter")
    record = reverted(state)
    assert record is not None and (record.generation, record.revert_to, record.reverted_at) == (5, 4, NOW)
    assert reverted_text(record) == ("reverted at 2027-01-15T08:00:00Z: generation 5 rolled back to generation 4: "
                                     "not confirmed by 2027-01-15T08:00:00Z (by the reverter)")
    (state.path / "reverted.json").write_text('{"generation": 5, "digest": "", "reverted_at": NaN}')
    with pytest.raises(StateError, match="corrupt"):
        reverted(state)


def test_the_journal_record_of_a_rollback_has_the_fields_its_catalog_entry_shows() -> None:
    record = reverted_record(5, None, "unconfirmed when the machine booted", "agent")
    assert record.message_id == MESSAGE_ID_REVERTED
    assert record.fields["HOSTWALL_REVERT_TO"] == "none" and "no hostwall table" in record.message
    shown = set(re.findall(r"@([A-Z0-9_]+)@", sections()[MESSAGE_ID_REVERTED]))
    assert shown and shown <= set(record.fields)


# --- 4. a damaged pending file is an error, never a traceback ----------------------------------


@pytest.mark.parametrize("content", [
    '{"generation": 2, "revert_to": 1, "deadline": NaN}', '{"generation": 2, "revert_to": 1, "deadline": Infinity}',
    '{"generation": "2", "revert_to": 1, "deadline": 5}', '{"generation": 2, "revert_to": 1}', "[", "",
])
def test_a_damaged_pending_file_is_a_state_error(tmp_path: Path, content: str) -> None:
    state = StateDir(tmp_path)
    (tmp_path / "pending.json").write_text(content)
    with pytest.raises(StateError, match=r"pending\.json"):
        state.pending()


def test_a_good_pending_file_is_read() -> None:
    assert math.isfinite(Pending(1, None, NOW).deadline)


# --- 7. read-only commands write nothing; single policy files --------------------------------


def test_validate_check_and_audit_write_nothing(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "p.yaml").write_text("services:\n  https:\n    allow:\n      - file: l.txt\n" + META)
    (policy / "l.txt").write_text("".join(f"10.0.{i}.0/24\n" for i in range(200)))
    for args in (["validate"], ["check", "--no-kernel", "10.0.1.1", "443"], ["audit", "--no-usage"], ["owners"]):
        result = invoke(tmp_path, "--policy-dir", str(policy), *args)
        assert result.exit_code in (0, 10), (args, result.output)
    assert not (tmp_path / "state").exists()


def test_a_single_policy_file_that_is_a_symlink_or_not_yaml_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.yaml"
    secret.write_text("hunter2: the password\n")
    link = tmp_path / "policy.yaml"
    link.symlink_to(secret)
    result = invoke(tmp_path, "validate", str(link))
    assert result.exit_code == 3 and "is a symlink" in result.stderr
    other = tmp_path / "shadow"
    other.write_text("hunter2: the password\n")
    result = invoke(tmp_path, "validate", str(other))
    assert result.exit_code == 3 and "not a policy file" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_a_named_service_that_admits_nobody_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("services:\n  metrics:\n    ports: [9100]\n    allow: []\n")
    result = invoke(tmp_path, "validate", str(tmp_path / "p.yaml"))
    assert result.exit_code == 0
    assert "services.metrics: allows no source, so 9100/tcp answers loopback only" in result.stderr
    audit = invoke(tmp_path, "--policy-dir", str(tmp_path / "p.yaml"), "audit", "--no-usage", "--json",
                   "--fail-on", "warning")
    assert audit.exit_code == 10
    assert [f["rule"] for f in json.loads(audit.stdout)["findings"]] == ["allows-nobody"]
    # https and postgres, named by no file, are closed by default: no warning for them.
    assert "https" not in result.stderr and "postgres" not in result.stderr


def test_os_environ_is_not_read_when_an_environment_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.7 1 192.0.2.1 22")
    assert find_ssh_session(os.getpid(), tmp_path, environ={}) is None
