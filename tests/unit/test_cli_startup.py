"""`hostwall --help` stays cheap: the CLI module imports the policy models (pydantic)
and the adapters only in the commands that use them (tests/bench/bench_cli.py times it);
and the command ends without the interpreter's teardown, its output and exit status whole."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest

from hostwall import cli, state


def test_the_cli_repeats_the_state_directory_defaults_exactly() -> None:
    assert (cli.DEFAULT_STATE_DIR, cli.DEFAULT_KEEP) == (state.DEFAULT_STATE_DIR, state.DEFAULT_KEEP)


def test_importing_the_cli_leaves_the_heavy_modules_unloaded() -> None:
    probe = ("import sys, hostwall.cli; "
             "print(sorted(m for m in ('pydantic', 'yaml', 'pyroute2', 'nftables', 'hostwall.policy') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


# The command as the installed script runs it, with an atexit handler standing in for
# the interpreter's teardown (atexit handlers run at its start).
AS_INSTALLED = ("import atexit, sys; atexit.register(lambda: print('teardown', file=sys.stderr)); "
                "sys.argv = ['hostwall', *sys.argv[1:]]; from hostwall.cli import {entry}; {entry}()")


def run_as_installed(entry: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", AS_INSTALLED.format(entry=entry), *args], capture_output=True,
                          text=True, check=False, timeout=60)


def test_the_command_ends_without_the_interpreters_teardown(tmp_path: Path) -> None:
    done = run_as_installed("run", "--version")
    assert (done.returncode, done.stdout.startswith("hostwall, version"), done.stderr) == (0, True, "")
    refused = run_as_installed("run", "--policy-dir", str(tmp_path / "absent"), "validate")
    assert refused.returncode == 3  # the documented exit code of an invalid policy
    assert "no such file" in refused.stderr and "teardown" not in refused.stderr
    # The probe sees a teardown where there is one: the click command itself has it.
    assert "teardown" in run_as_installed("main", "--version").stderr


def test_output_longer_than_a_pipe_holds_is_all_written(tmp_path: Path) -> None:
    entries = "".join(f"      - cidr: 10.{n >> 8}.{n & 255}.0/24\n        owner: ops\n        reason: r{n}\n"
                      f"        review_by: {date.today() + timedelta(days=365)}\n" for n in range(3000))
    (tmp_path / "p.yaml").write_text(f"services:\n  https:\n    allow:\n{entries}")
    exported = run_as_installed("run", "--policy-dir", str(tmp_path), "export", "--format", "nginx")
    assert exported.returncode == 0, exported.stderr
    assert len(exported.stdout) > 100_000  # a pipe holds 64 KiB
    assert exported.stdout.count("allow 10.") == 3000
    assert exported.stdout == run_as_installed("main", "--policy-dir", str(tmp_path), "export", "--format",
                                               "nginx").stdout


STAND_IN = ("import sys; from hostwall import cli\n"
            "def main(prog_name):\n"
            "    sys.stdout.write('x' * 1000)\n"  # held in the buffer, not flushed: run must flush it
            "    sys.exit({code})\n"
            "cli.main = main\ncli.run()\n")


@pytest.mark.parametrize(("code", "status", "stderr"),
                         [("None", 0, ""), ("7", 7, ""), ("'went wrong'", 1, "went wrong\n")])
def test_run_flushes_the_output_and_keeps_the_exit_status(code: str, status: int, stderr: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    ended = subprocess.run([sys.executable, "-c", STAND_IN.format(code=code)], capture_output=True, text=True,
                           env=environment, check=False, timeout=60)
    assert (ended.returncode, len(ended.stdout), ended.stderr) == (status, 1000, stderr)
