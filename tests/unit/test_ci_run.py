"""CI's entry point, .ci/run, runs the README's test command so that the CI gates see CI.

sudo's env_reset drops CI: a `sudo make test` in .ci/run turns every "fail instead of skip
in CI" gate (tests/ci_gate.py and its kin) into a skip, and CI stays green while the real
kernel is never asked. Two checks: .ci/run itself, run against a recording Makefile, must
hand CI to `make test`; and a test process started by .ci/run must see CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from ci_gate import skip_or_fail_in_ci

ROOT = Path(__file__).resolve().parents[2]
CI_RUN = ROOT / ".ci" / "run"


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's quick start has no sh block"
    return [line.split("#", 1)[0].strip() for line in block[1].splitlines() if line.split("#", 1)[0].strip()]


def _ci_run_commands() -> list[str]:
    return [line.strip() for line in CI_RUN.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_ci_run_calls_the_readme_test_command_for_root_without_sudo() -> None:
    quick_start = _quick_start_commands()
    assert "make test" in quick_start, quick_start
    commands = _ci_run_commands()
    assert "make test" in commands, commands
    assert not [c for c in commands if re.search(r"\bsudo\b", c)], commands


def _ancestor_command_lines() -> list[list[str]]:
    lines: list[list[str]] = []
    pid = os.getppid()
    while pid > 1:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        lines.append([part.decode(errors="replace") for part in raw.split(b"\0") if part])
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return lines


def _started_by_ci_run() -> bool:
    return any(Path(arg).name == "run" and Path(arg).parent.name == ".ci"
               for line in _ancestor_command_lines() for arg in line)


def test_a_test_started_by_ci_run_sees_ci() -> None:
    """Fails when .ci/run drops CI on its way to pytest (e.g. through sudo)."""
    if not _started_by_ci_run():
        pytest.skip("not started by .ci/run")
    assert os.environ.get("CI"), "started by .ci/run, yet CI is not set: the CI gates would skip"


@pytest.mark.real_clock
def test_ci_run_hands_ci_to_make_test(tmp_path: Path) -> None:
    """The real .ci/run, in a copy of the tree whose Makefile records what `make test` sees."""
    skip_or_fail_in_ci(None if os.geteuid() == 0 else "the CI entry point runs as root", ".ci/run")
    skip_or_fail_in_ci(None if shutil.which("make") else "make is not installed", ".ci/run")
    (tmp_path / ".ci").mkdir()
    shutil.copy2(CI_RUN, tmp_path / ".ci" / "run")
    record = tmp_path / "seen"
    (tmp_path / "Makefile").write_text(f"test:\n\t@printf '%s\\n' \"CI=$$CI\" > {record}\n")
    for given in ({"CI": "true"}, {}):
        environment = {k: v for k, v in os.environ.items() if k != "CI"} | given
        result = subprocess.run([str(tmp_path / ".ci" / "run")], env=environment, capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert record.read_text().strip() == f"CI={given.get('CI', 'true')}", (given, record.read_text())
        record.unlink()
