"""The Vagrant lab's files parse (Vagrant itself does not run here), and its playbook finds
the role in the built and installed collection by its full name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from collection_support import Collection, ansible_environment

VAGRANT = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrantfile_is_valid_ruby() -> None:
    ruby = shutil.which("ruby")
    if ruby is None:
        if os.environ.get("CI"):
            pytest.fail("ruby is missing; scripts/setup.sh installs it")
        pytest.skip("ruby is not installed")
    result = subprocess.run([ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_playbook_and_vars_are_yaml_with_the_expected_plays() -> None:
    plays = yaml.safe_load((VAGRANT / "playbook.yml").read_text())
    assert isinstance(plays, list) and any(play.get("serial") for play in plays)
    assert any("hostwall.firewall.hostwall" in play.get("roles", []) for play in plays)
    for path in (VAGRANT / "group_vars").glob("*.yml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def syntax_check(collections: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {**ansible_environment(tmp_path), "ANSIBLE_COLLECTIONS_PATH": str(collections)}
    return subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check",
                           "-i", "localhost,", str(VAGRANT / "playbook.yml")],
                          capture_output=True, text=True, env=environment, timeout=120, check=False)


def test_playbook_uses_the_installed_collection(installed_collection: Collection, tmp_path: Path) -> None:
    assert syntax_check(installed_collection.path, tmp_path).returncode == 0
    missing = syntax_check(tmp_path / "no-collections", tmp_path)
    assert missing.returncode != 0 and "hostwall.firewall.hostwall" in missing.stdout + missing.stderr
