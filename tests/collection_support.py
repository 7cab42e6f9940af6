"""The hostwall.firewall Ansible collection as an operator gets it: built into a tarball by
scripts/build-collection.sh (what `make collection` runs) and installed from it with
`ansible-galaxy collection install`, once per test session."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SOURCE = REPOSITORY / "ansible" / "hostwall" / "firewall"
BUILD_TIMEOUT = 300


@dataclass(frozen=True)
class Collection:
    tarball: Path
    path: Path  # a collections path: ansible_collections/hostwall/firewall is inside it

    @property
    def root(self) -> Path:
        return self.path / "ansible_collections" / "hostwall" / "firewall"


def ansible_environment(home: Path) -> dict[str, str]:
    """The environment for ansible commands, with no Ansible setting or home of the caller's."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "HOSTWALL_"))}
    environment.update({"HOME": str(home), "ANSIBLE_HOME": str(home / ".ansible"), "LC_ALL": "C.UTF-8",
                        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_DEPRECATION_WARNINGS": "0",
                        "PYTHONWARNINGS": "ignore"})
    return environment


def build_and_install(workdir: Path) -> Collection:
    if importlib.util.find_spec("ansible") is None:
        reason = "ansible-core is not installed in this environment (pyproject's dev extra has it)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    bin_dir = Path(sys.executable).parent
    environment = ansible_environment(workdir / "home")
    environment["VENV"] = str(bin_dir.parent)
    environment["PATH"] = f"{bin_dir}:{environment.get('PATH', '/usr/bin:/bin')}"
    dist = workdir / "dist"
    built = subprocess.run([str(REPOSITORY / "scripts" / "build-collection.sh"), str(dist)],
                           capture_output=True, text=True, env=environment, timeout=BUILD_TIMEOUT, check=False)
    assert built.returncode == 0, f"build failed:\n{built.stdout}\n{built.stderr}"
    (tarball,) = dist.glob("hostwall-firewall-*.tar.gz")
    collections = workdir / "collections"
    installed = subprocess.run([str(bin_dir / "ansible-galaxy"), "collection", "install", "-p", str(collections),
                                str(tarball)], capture_output=True, text=True, env=environment,
                               timeout=BUILD_TIMEOUT, check=False)
    assert installed.returncode == 0, f"install failed:\n{installed.stdout}\n{installed.stderr}"
    return Collection(tarball, collections)
