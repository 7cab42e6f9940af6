"""What the Ansible tests share: a private Ansible root (home, temporary directories, a
callback that records every task result), the hostwall command this test process
imports, and interpreters that run modules inside a lab's client namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from collection_support import Collection

import hostwall

# ansible-core ships no JSON stdout callback (it lives in ansible.posix), so a small
# aggregate callback records every task result to a file while the default callback
# prints what an operator sees.
RECORD_CALLBACK = """
import json
import os

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record"
    CALLBACK_NEEDS_ENABLED = True

    def _record(self, result, status):
        with open(os.environ["HOSTWALL_TEST_RECORD"], "a", encoding="utf-8") as handle:
            entry = {"task": result._task.get_name(), "host": result._host.get_name(), "status": status,
                     "result": dict(result._result)}
            handle.write(json.dumps(entry, default=str) + "\\n")

    def v2_runner_on_ok(self, result):
        self._record(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result):
        self._record(result, "skipped")
"""


def prepare_root(root: Path) -> None:
    for directory in ("home", "local-tmp", "remote-tmp", "cp", "callbacks"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "callbacks" / "record.py").write_text(RECORD_CALLBACK)
    (root / "ansible.cfg").write_text("[defaults]\n")


def hostwall_wrapper(root: Path) -> Path:
    """The same hostwall that this test process imports, wherever it comes from."""
    wrapper = root / "hostwall"
    source = Path(hostwall.__file__).resolve().parents[1]
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{source}${{PYTHONPATH:+:$PYTHONPATH}}" '
                       f'exec "{sys.executable}" -m hostwall "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def netns_python(root: Path, namespace: str) -> Path:
    """A Python interpreter that runs inside the network namespace."""
    wrapper = root / f"python-{namespace}"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec "{namespace}" "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def ansible_environment(root: Path, collection: Collection) -> dict[str, str]:
    """Nothing from the user's home or Ansible settings; the installed collection."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "HOSTWALL_"))}
    environment.update({
        "HOME": str(root / "home"),
        "LC_ALL": "C.UTF-8",
        "ANSIBLE_CONFIG": str(root / "ansible.cfg"),
        "ANSIBLE_HOME": str(root / "home" / ".ansible"),
        "ANSIBLE_LOCAL_TEMP": str(root / "local-tmp"),
        "ANSIBLE_REMOTE_TEMP": str(root / "remote-tmp"),
        "ANSIBLE_COLLECTIONS_PATH": str(collection.path),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(root / "cp"),
        "ANSIBLE_PERSISTENT_CONTROL_PATH_DIR": str(root / "cp"),
        "ANSIBLE_CALLBACK_PLUGINS": str(root / "callbacks"),
        "ANSIBLE_CALLBACKS_ENABLED": "record",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_GATHERING": "explicit",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
    })
    return environment


@dataclass
class Run:
    process: subprocess.CompletedProcess[str]
    record: Path

    def results(self) -> list[dict[str, Any]]:
        """The result of every task, in order (from the record callback)."""
        if not self.record.exists():
            pytest.fail(f"no task results (rc={self.process.returncode})\n"
                        f"stdout: {self.process.stdout}\nstderr: {self.process.stderr}")
        lines = self.record.read_text().splitlines()
        return [{**entry["result"], "task_status": entry["status"]} for entry in map(json.loads, lines)]

    def tasks(self) -> list[str]:
        return [json.loads(line)["task"] for line in self.record.read_text().splitlines()]

    def result(self) -> dict[str, Any]:
        (only,) = self.results()
        return only

    def hosts(self) -> list[str]:
        """The host of every task result, in order."""
        return [json.loads(line)["host"] for line in self.record.read_text().splitlines()]
