"""Output people read: tables and colour on a terminal (run under a pseudo-terminal),
plain text when piped, --quiet, progress only on a terminal, help and completion."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import click
import pytest
from test_cli import invoke
from unit_support import WriteFiles

from hostwall.cli import every_command, main
from hostwall.cli.kernel import agent_view
from hostwall.engine import Engine
from hostwall.fake import FakeBackend
from hostwall.output import plain_table
from hostwall.policy import load_policy
from hostwall.state import AgentState, StateDir

POLICY = (
    "services:\n  https:\n    allow:\n"
    "      - cidr: 10.0.0.0/16\n        owner: platform\n        reason: app\n        review_by: 2099-01-01\n"
    "      - file: long.txt\n        owner: partner-c\n        reason: ranges\n        review_by: 2099-01-01\n"
)
ESCAPE = "\x1b["


@pytest.fixture
def root(write_files: WriteFiles) -> Path:
    return write_files({"policy.yaml": POLICY, "long.txt": "198.51.100.0/24\n"})


def _environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_") and k != "NO_COLOR"}
    environment.update({"TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"})
    return environment


def run_in_terminal(root: Path, *args: str) -> tuple[int, str]:
    """hostwall with stdout and stderr on a pseudo-terminal, as an operator's shell runs it."""
    controller, terminal = pty.openpty()
    command = [sys.executable, "-m", "hostwall", "--policy-dir", str(root), "--state-dir",
               str(root.parent / "state"), *args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               env=_environment(), close_fds=True)
    os.close(terminal)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            if not ready:
                pytest.fail(f"no output from {args} within 60 s")
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(controller)
        code = process.wait(timeout=60)
    return code, b"".join(chunks).decode()


def run_piped(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hostwall", "--policy-dir", str(root), "--state-dir",
               str(root.parent / "state"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=60, check=False)


def test_terminal_gets_a_table_with_colour_and_a_pipe_gets_plain_columns(root: Path) -> None:
    code, screen = run_in_terminal(root, "audit", "--no-usage", "--fail-on", "never")
    assert code == 0
    assert "┏" in screen and "severity" in screen
    assert f"{ESCAPE}33m" in screen  # warning in yellow

    piped = run_piped(root, "audit", "--no-usage", "--fail-on", "never")
    assert piped.returncode == 0
    assert ESCAPE not in piped.stdout and "┏" not in piped.stdout
    assert piped.stdout.splitlines()[0].startswith("warning  too-broad  ")


def test_owners_table_on_a_terminal_and_piped(root: Path) -> None:
    _, screen = run_in_terminal(root, "owners")
    assert f"{ESCAPE}1mowner" in screen  # a bold header
    assert "━" in screen

    piped = run_piped(root, "owners").stdout.splitlines()
    assert piped == ["owner      entries  services  next review",
                     "partner-c        1  https     2099-01-01",
                     "platform         1  https     2099-01-01"]


def test_denied_is_red_on_a_terminal(root: Path) -> None:
    code, screen = run_in_terminal(root, "check", "--no-kernel", "192.0.2.1", "443")

    assert code == 10
    assert f"{ESCAPE}1;31mdenied: no allow entry" in screen


def test_progress_bar_for_a_long_list_only_on_a_terminal(root: Path) -> None:
    lines = "".join(f"10.{i >> 8 & 255}.{i & 255}.0/24\n" for i in range(1 << 15))
    (root / "long.txt").write_text(lines)

    code, screen = run_in_terminal(root, "validate")
    assert code == 0
    assert "parsing long.txt" in screen
    assert "valid: 1 file(s)" in screen

    # validate reads the list cache and writes nothing, so the piped run parses it again.
    assert not (root.parent / "state").exists()
    piped = run_piped(root, "validate")
    assert piped.returncode == 0
    assert "parsing" not in piped.stderr and ESCAPE not in piped.stderr


def test_quiet_prints_nothing_on_success_and_keeps_the_exit_code(root: Path) -> None:
    assert invoke(root, "--quiet", "validate").stdout == ""
    denied = invoke(root, "-q", "check", "--no-kernel", "192.0.2.1", "443")
    assert (denied.exit_code, denied.stdout) == (10, "")
    audit = invoke(root, "-q", "audit", "--no-usage", "--fail-on", "warning")
    assert (audit.exit_code, audit.stdout) == (10, "")


def test_quiet_still_reports_errors(root: Path) -> None:
    (root / "policy.yaml").write_text("services: [\n")
    result = invoke(root, "-q", "validate")

    assert result.exit_code == 3
    assert result.stderr.startswith("hostwall: ")


def test_quiet_keeps_json(root: Path) -> None:
    result = invoke(root, "-q", "validate", "--json")

    assert '"valid": true' in result.stdout


def test_every_command_help_ends_with_an_example(root: Path) -> None:
    assert isinstance(main, click.Group)
    for name, command in every_command().items():
        if command.hidden:
            continue
        result = invoke(root, name, "--help")
        assert result.exit_code == 0, name
        last_paragraph = result.stdout.rstrip().split("\n\n")[-1].strip()
        assert last_paragraph.startswith("Example: "), f"hostwall {name} --help does not end with an example"
    assert invoke(root, "--help").stdout.rstrip().split("\n\n")[-1].strip().startswith("Example: ")


@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete -o nosort -F"), ("zsh", "#compdef hostwall")])
def test_shell_completion_scripts(shell: str, marker: str) -> None:
    environment = {**_environment(), "_HOSTWALL_COMPLETE": f"{shell}_source"}
    result = subprocess.run([sys.executable, "-c", "from hostwall.cli import main; main(prog_name='hostwall')"],
                            capture_output=True, text=True, env=environment, timeout=60, check=False)

    assert result.returncode == 0
    assert marker in result.stdout


def test_completion_offers_the_commands() -> None:
    environment = {**_environment(), "_HOSTWALL_COMPLETE": "bash_complete", "COMP_WORDS": "hostwall au",
                   "COMP_CWORD": "1"}
    result = subprocess.run([sys.executable, "-c", "from hostwall.cli import main; main(prog_name='hostwall')"],
                            capture_output=True, text=True, env=environment, timeout=60, check=False)

    assert "plain,audit" in result.stdout.splitlines()


def test_plain_table_aligns_columns_without_trailing_spaces() -> None:
    assert plain_table(["a", "count"], [["long name", "1"], ["b", "10"]], right=(1,)) == [
        "a          count", "long name      1", "b             10"]


# --- the agent line of status -----------------------------------------------------------------


def state(running: bool = True, heartbeat: float = 1000.0) -> AgentState:
    return AgentState(pid=42, started=400.0, heartbeat=heartbeat, status="generation 3 loaded, 2 entries",
                      running=running)


def test_agent_view() -> None:
    assert agent_view(None, 1000.0, lambda pid: True).state == "unknown"
    running = agent_view(state(), 1002.0, lambda pid: True)
    assert (running.state, running.detail) == ("running", "pid 42, up 10m: generation 3 loaded, 2 entries")
    assert agent_view(state(), 1100.0, lambda pid: True).state == "stale"
    gone = agent_view(state(), 1002.0, lambda pid: False)
    assert gone.state == "stopped" and "did not stop cleanly" in gone.detail
    assert agent_view(state(running=False), 1060.0, lambda pid: False).detail == "stopped 1m ago"


def _two_generations(root: Path) -> None:
    """Generations 1 and 2 in the state directory, loaded into the in-memory kernel."""
    engine = Engine(FakeBackend(), StateDir(root.parent / "state"))
    engine.apply(load_policy(root), user="alice", message="first")
    (root / "long.txt").write_text("198.51.100.0/24\n203.0.113.0/24\n")
    engine.apply(load_policy(root), user="alice", message="partner-c grows")


def test_generations_table_marks_the_loaded_one(root: Path) -> None:
    _two_generations(root)
    _, screen = run_in_terminal(root, "generations")
    assert "┏" in screen and "partner-c grows" in screen
    assert f"{ESCAPE}32m*" in screen  # the loaded generation, in green

    piped = run_piped(root, "generations").stdout.splitlines()
    assert piped[0].split() == ["generation", "created", "user", "entries", "sha256", "message"]
    assert [line.split()[0] for line in piped[1:]] == ["1", "*"]
    assert piped[2].split()[1:2] == ["2"]


def test_diff_colours_added_and_removed_entries_on_a_terminal(root: Path) -> None:
    _two_generations(root)
    _, screen = run_in_terminal(root, "diff", "1", "2")
    assert f"{ESCAPE}32m  + 203.0.113.0/24" in screen
    _, screen = run_in_terminal(root, "diff", "2", "1")
    assert f"{ESCAPE}1;31m  - 203.0.113.0/24" in screen  # bold red, as errors are
    assert run_piped(root, "diff", "1", "2").stdout.splitlines() == [
        "service https: entries", "  + 203.0.113.0/24"]
