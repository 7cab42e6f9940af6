"""The hostwall.firewall collection as built by `make collection` and installed with
ansible-galaxy: what it ships, and that ansible-doc documents exactly what the modules take."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import yaml
from collection_support import REPOSITORY, SOURCE, Collection, ansible_environment

UNITS = REPOSITORY / "units"
MODULES = ("hostwall", "tcp_probe")


def argument_spec(module: str) -> dict[str, Any]:
    """The argument_spec literal that the module's main() hands AnsibleModule."""
    tree = ast.parse((SOURCE / "plugins" / "modules" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec":
            spec: dict[str, Any] = ast.literal_eval(node.value)
            return spec
    raise AssertionError(f"{module}: no argument_spec")


def documented(collection: Collection, module: str, tmp_path: Path) -> dict[str, Any]:
    environment = {**ansible_environment(tmp_path), "ANSIBLE_COLLECTIONS_PATH": str(collection.path)}
    result = subprocess.run([str(Path(sys.executable).parent / "ansible-doc"), "--json", f"hostwall.firewall.{module}"],
                            capture_output=True, text=True, env=environment, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)[f"hostwall.firewall.{module}"]
    return document


def spec_shape(spec: dict[str, Any]) -> dict[str, Any]:
    return {name: (option.get("type", "str"), option.get("elements"), option.get("default"),
                   spec_shape(option["options"]) if "options" in option else None)
            for name, option in spec.items()}


def doc_shape(options: dict[str, Any]) -> dict[str, Any]:
    return {name: (option.get("type", "str"), option.get("elements"), option.get("default"),
                   doc_shape(option["suboptions"]) if "suboptions" in option else None)
            for name, option in options.items()}


def test_ansible_doc_documents_every_option_as_the_module_takes_it(
        installed_collection: Collection, tmp_path: Path) -> None:
    for module in MODULES:
        document = documented(installed_collection, module, tmp_path)
        assert doc_shape(document["doc"]["options"]) == spec_shape(argument_spec(module)), module
        assert document["return"], module
        assert all(value.get("description") for value in document["return"].values()), module
    settings = documented(installed_collection, "hostwall", tmp_path)["doc"]["options"]["settings"]["suboptions"]
    assert {"strict_source", "owners", "log_group", "log_rate", "log_burst"} == set(settings)


def test_module_settings_are_the_policy_settings() -> None:
    from hostwall.policyfile import SettingsModel

    assert set(argument_spec("hostwall")["settings"]["options"]) == set(SettingsModel.model_fields)


def test_tarball_ships_the_role_files_and_the_wheel(installed_collection: Collection) -> None:
    version = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["version"]
    galaxy = yaml.safe_load((SOURCE / "galaxy.yml").read_text())
    assert installed_collection.tarball.name == f"hostwall-firewall-{galaxy['version']}.tar.gz"
    with tarfile.open(installed_collection.tarball) as tarball:
        names = set(tarball.getnames())
    assert {"plugins/modules/hostwall.py", "plugins/modules/tcp_probe.py", "roles/hostwall/tasks/main.yml",
            "playbooks/rollout.yml", "LICENSE", "MANIFEST.json",
            f"roles/hostwall/files/dist/hostwall-{version}-py3-none-any.whl"} <= names
    files = installed_collection.root / "roles" / "hostwall" / "files"
    for name in ("hostwall.service", "hostwall.catalog", "sudoers.hostwall"):
        assert (files / name).read_bytes() == (UNITS / name).read_bytes(), name


def test_role_takes_nothing_from_the_repository() -> None:
    for path in (SOURCE / "roles").rglob("*.yml"):
        text = path.read_text()
        assert "role_path }}/.." not in text and "/../" not in text, path
