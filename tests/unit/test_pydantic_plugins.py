"""pydantic's plugins are never loaded by hostwall, whatever lies on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

# The validating process reads the real clock: a review date a year from today's.
POLICY = f"""services:
  https:
    allow:
      - cidr: 192.0.2.0/24
        owner: ops
        reason: partner
        review_by: {date.today() + timedelta(days=365)}
"""


def _plant_plugin(site: Path, marker: Path) -> None:
    """A distribution whose metadata names a pydantic plugin that leaves a marker when imported."""
    info = site / "planted-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: planted\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pydantic]\nplanted = planted_plugin:plugin\n")
    (site / "planted_plugin.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "class _Plugin:\n    def new_schema_validator(self, *args, **kwargs):\n        return None, None, None\n"
        "plugin = _Plugin()\n")


def _validate_in_a_process(site: Path, policy: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from hostwall import policyfile; "
              "from pathlib import Path; spec = policyfile.validate_file(sys.argv[2], Path(sys.argv[2]).read_text()); "
              "assert not isinstance(spec, list), spec")
    return subprocess.run([sys.executable, "-c", script, str(site), str(policy)], capture_output=True, text=True,
                          timeout=60, env=environment, check=False)


def test_a_planted_pydantic_plugin_is_not_imported(tmp_path: Path) -> None:
    site, marker, policy = tmp_path / "site", tmp_path / "marker", tmp_path / "policy.yml"
    _plant_plugin(site, marker)
    policy.write_text(POLICY)
    # An environment that asks for every plugin (an empty list disables none) is overruled too.
    environment = {**os.environ, "PYDANTIC_DISABLE_PLUGINS": ""}
    result = _validate_in_a_process(site, policy, environment)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_the_planted_plugin_is_one_pydantic_would_load(tmp_path: Path) -> None:
    """The test above can fail: without hostwall's setting, pydantic imports this plugin."""
    site, marker = tmp_path / "site", tmp_path / "marker"
    _plant_plugin(site, marker)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import pydantic\n"
              "class Model(pydantic.BaseModel):\n    x: int\nModel(x=1)\n")
    result = subprocess.run([sys.executable, "-c", script, str(site)], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}, check=False)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "imported"



def test_validating_does_not_import_the_metadata_scanner(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    script = ("import sys; from pathlib import Path; from hostwall import policyfile; "
              "spec = policyfile.validate_file(sys.argv[1], Path(sys.argv[1]).read_text()); "
              "assert not isinstance(spec, list), spec; "
              "print(sorted(m for m in ('importlib.metadata', 'email', 'zipfile') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script, str(policy)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pydantic_takes_nothing_but_get_plugins_from_its_plugin_loader() -> None:
    """hostwall stands in for pydantic.plugin._loader with a module that has get_plugins
    alone: a pydantic that uses anything else of it must not pass unnoticed."""
    import pydantic

    package = Path(pydantic.__file__).parent
    uses = sorted({line.strip() for source in package.rglob("*.py")
                   for line in source.read_text(encoding="utf-8").splitlines() if "_loader" in line})
    assert uses == ["from ._loader import get_plugins"], uses
