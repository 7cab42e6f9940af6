"""`hostwall --help` stays cheap: the CLI module imports the policy models (pydantic)
and the adapters only in the commands that use them (tests/bench/bench_cli.py times it)."""

from __future__ import annotations

import subprocess
import sys

from hostwall import cli, state


def test_the_cli_repeats_the_state_directory_defaults_exactly() -> None:
    assert (cli.DEFAULT_STATE_DIR, cli.DEFAULT_KEEP) == (state.DEFAULT_STATE_DIR, state.DEFAULT_KEEP)


def test_importing_the_cli_leaves_the_heavy_modules_unloaded() -> None:
    probe = ("import sys, hostwall.cli; "
             "print(sorted(m for m in ('pydantic', 'yaml', 'pyroute2', 'nftables', 'hostwall.policy') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
