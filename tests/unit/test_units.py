"""The shipped systemd unit and sudoers example, checked by systemd's and sudo's own tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"
EXPOSURE_LIMIT = 1.5


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing; the set-up installs it")
        pytest.skip(f"{name} is not installed")
    return path


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at a binary that exists here:
    verify refuses a unit whose command is missing."""
    unit = tmp_path / "hostwall.service"
    unit.write_text((UNITS / "hostwall.service").read_text().replace("/usr/local/bin/hostwall", "/bin/true"))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify runs `man` for each man: page in Documentation=: the generated ones must exist.
    subprocess.run([sys.executable, str(UNITS.parent / "scripts" / "gendocs.py"), "--man",
                    str(tmp_path / "man" / "man8")], check=True, timeout=60)
    result = subprocess.run([_tool("systemd-analyze"), "verify", str(_installed_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "MANPATH": f"{tmp_path / 'man'}:"})
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_unit_exposure_is_at_most_the_target(tmp_path: Path) -> None:
    result = subprocess.run(
        [_tool("systemd-analyze"), "security", "--offline=true", str(_installed_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for hostwall.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= EXPOSURE_LIMIT, result.stdout


def test_unit_is_a_notify_service_ordered_before_the_network() -> None:
    text = (UNITS / "hostwall.service").read_text()
    for line in ("Type=notify", "Before=network-pre.target shutdown.target", "Wants=network-pre.target",
                 "ExecReload=/bin/sh -c 'kill -HUP \"$$MAINPID\"'", "Restart=on-failure",
                 "CapabilityBoundingSet=CAP_NET_ADMIN",
                 "RestrictAddressFamilies=AF_NETLINK AF_UNIX", "SystemCallFilter=@system-service",
                 "StateDirectory=hostwall", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", text, re.MULTILINE)


def test_sudoers_example_parses_and_allows_only_the_operator_commands() -> None:
    sudoers = UNITS / "sudoers.hostwall"
    result = subprocess.run([_tool("visudo"), "-c", "-f", str(sudoers)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    allowed = set(re.findall(r"/usr/local/bin/hostwall (\w+)", sudoers.read_text()))
    assert allowed == {"plan", "apply", "rollback", "confirm", "status"}
