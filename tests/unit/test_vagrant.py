"""The Vagrant lab's files parse (Vagrant itself does not run here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

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
    for path in (VAGRANT / "group_vars").glob("*.yml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
