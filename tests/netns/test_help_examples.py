"""Every command's --help ends with an example, and every example runs as written.

Each example is taken from the command's epilog, `sudo` dropped (the tests run as root),
and run against a lab namespace with a copy of the README's example policy (policies/)
and a state directory of its own: the global options that point there are put in front
of the command, and the paths an example names on a host are mapped to temporary ones.
An example that no longer parses, names a generation or an entry that the example
policy does not have, or crashes, fails here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from netns_support import COMMAND_TIMEOUT, Journald

from hostwall.cli import every_command, main
from hostwall.lab import Lab

pytestmark = pytest.mark.root

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "policies"
# What each command may answer when it works: 10 is "needs attention" where the
# command documents it (README, exit codes).
ALLOWED_EXITS = {"plan": {0, 10}, "status": {0, 10}, "check": {0, 10}, "audit": {0, 10}}
LONG_RUNNING = {"agent"}


def help_examples() -> list[tuple[str, str]]:
    assert isinstance(main, click.Group)
    examples = [("hostwall", _example(main))]
    for name, command in sorted(every_command().items()):
        if not command.hidden:
            examples.append((name, _example(command)))
    return examples


def _example(command: click.Command) -> str:
    epilog = command.epilog or ""
    assert epilog.startswith("Example: "), f"{command.name}: the epilog is not an example"
    return epilog.removeprefix("Example: ").replace("\b", "").strip()


class Sandbox:
    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.policy = root / "policies"
        shutil.copytree(EXAMPLE_POLICY, self.policy, ignore=shutil.ignore_patterns("examples"))
        self.state = root / "state"
        self.metrics = root / "node_exporter" / "hostwall.prom"
        self.metrics.parent.mkdir()
        self.environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}

    def paths(self, word: str) -> str:
        mapped = {"policies/": str(self.policy), "/etc/hostwall/policies": str(self.policy),
                  "/var/lib/node_exporter/hostwall.prom": str(self.metrics),
                  "/etc/nginx/allow.conf": str(self.metrics.parent / "allow.conf")}
        return mapped.get(word, word)

    def commands(self, example: str) -> list[list[str]]:
        """The example's commands (split at &&), each ready to run here."""
        commands, current = [], []
        for word in [*shlex.split(example), "&&"]:
            if word != "&&":
                current.append(word)
                continue
            if current[:1] == ["sudo"]:
                current = current[1:]
            assert current[:1] == ["hostwall"], f"not a hostwall command: {current}"
            words = [self.paths(w) for w in current[1:]]
            global_options = ["--netns", self.lab.server, "--state-dir", str(self.state)]
            if "--policy-dir" not in words:
                global_options += ["--policy-dir", str(self.policy)]
            commands.append([sys.executable, "-m", "hostwall", *global_options, *words])
            current = []
        return commands

    def run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, env=self.environment,
                              timeout=COMMAND_TIMEOUT * 4, check=False)

    def prepare(self) -> None:
        """Two generations, so that the examples of rollback and diff have something to name."""
        first = self.run(self.commands("hostwall apply -m first")[0])
        assert first.returncode == 0, first.stderr
        (self.policy / "partner-c-ranges.txt").write_text(
            (self.policy / "partner-c-ranges.txt").read_text() + "198.51.100.200/32\n")
        second = self.run(self.commands("hostwall apply -m second")[0])
        assert second.returncode == 0, second.stderr


def _command_name(words: list[str]) -> str:
    options_with_values = {"--netns", "--state-dir", "--policy-dir", "--keep-generations"}
    index = words.index("hostwall") + 1
    while index < len(words) and words[index].startswith("-"):
        index += 2 if words[index] in options_with_values else 1
    return words[index]


@pytest.mark.parametrize(("name", "example"), help_examples(), ids=[name for name, _ in help_examples()])
def test_the_help_example_runs(lab: Lab, tmp_path: Path, journald: Journald, name: str, example: str) -> None:
    sandbox = Sandbox(lab, tmp_path)
    sandbox.prepare()
    try:
        _run_example(sandbox, example)
    finally:
        # A --confirm-within example leaves a detached reverter waiting for its deadline;
        # confirming makes it exit within a second, before the lab namespace goes away.
        sandbox.run(sandbox.commands("hostwall confirm")[0])


def _run_example(sandbox: Sandbox, example: str) -> None:
    for command in sandbox.commands(example):
        command_name = _command_name(command)
        if command_name in LONG_RUNNING:
            _run_until_ready(sandbox, command)
            continue
        result = sandbox.run(command)
        allowed = ALLOWED_EXITS.get(command_name, {0})
        assert result.returncode in allowed, f"{example!r}: {shlex.join(command)}: {result.stderr}"
        assert "Traceback" not in result.stderr


def _run_until_ready(sandbox: Sandbox, command: list[str]) -> None:
    """The agent runs until stopped: it must come up (its metrics file appears), then stop
    cleanly on SIGTERM."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=sandbox.environment) as process:
        try:
            deadline = time.monotonic() + 60
            while not sandbox.metrics.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert process.poll() is None, f"the agent exited: {process.stderr.read() if process.stderr else ''}"
            assert sandbox.metrics.exists(), "the agent did not write its metrics within 60 s"
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    assert process.returncode == 0
