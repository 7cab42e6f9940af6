"""The README's examples and sample outputs, run or compared, so that they cannot drift.

Every fenced block of README.md and vagrant/README.md has a marker comment on the line
just above it that says how it is checked:

- `<!-- doc: policy -->`: a policy (with the lists of policies/ beside it); it validates.
- `<!-- doc: ruleset -->`: what `nft list table inet hostwall` shows after applying the
  README's policy block, in a namespace of the test's own.
- `<!-- doc: output hostwall demo -->`: the sample output of a command, run here (from the
  repository's root, so `--policy-dir policies` is the example policy).
- `<!-- doc: usage -->`: synopses, a command a line; every option named is in its `--help`.
- `<!-- doc: journal record -->`: a drop record as the agent writes it (its fields).
- `<!-- doc: run -->`: shell commands, run as written (with HOME in a temporary directory).
- `<!-- doc: make -->`: every `make TARGET` in it is a target of the Makefile, and every
  file it names exists.
- `<!-- doc: covered by PATH -->`: what the block does (install on a host, boot it) is
  done by that test; the file must exist and mention the block's commands. The Vagrant
  walkthrough names tests/boot/vagrant_lab.py, which `make vagrant-test` runs: booting
  three VMs under software emulation takes a quarter of an hour, so it is not in CI.

In sample outputs, a line that is only `…` stands for any number of lines, `…` inside a
line for any text, and blank lines are not compared. A block without a marker fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns_support import COMMAND_TIMEOUT, Journald, run_nft

from hostwall.drops import MESSAGE_ID_DROP, Drop, DropReporter, FloodControl
from hostwall.lab import Lab
from hostwall.packet import PacketSummary

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "README.md", ROOT / "vagrant" / "README.md")
MARKER = re.compile(r"<!-- doc: (.+?) -->")


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # of the opening fence
    language: str
    marker: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        index = 0
        while index < len(lines):
            if lines[index].lstrip().startswith("```"):
                start, language = index, lines[index].lstrip()[3:].strip()
                end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("```"))
                previous = lines[start - 1] if start else ""
                match = MARKER.fullmatch(previous.strip())
                found.append(Block(document, start + 1, language, match[1] if match else None,
                                   "\n".join(lines[start + 1:end]) + "\n"))
                index = end + 1
            else:
                index += 1
    return found


def the_policy_block() -> Block:
    [block] = [b for b in blocks() if b.marker == "policy" and b.document.name == "README.md"][:1]
    return block


def _fits(wanted: list[str], seen: list[str]) -> bool:
    if not wanted:
        return not seen
    if wanted[0] == "…":
        return any(_fits(wanted[1:], seen[rest:]) for rest in range(len(seen) + 1))
    pattern = ".*?".join(map(re.escape, wanted[0].split("…")))
    return bool(seen) and re.fullmatch(pattern, seen[0]) is not None and _fits(wanted[1:], seen[1:])


def matches(sample: str, actual: str) -> str | None:
    """None when actual fits the sample, else the first sample line that does not fit."""
    wanted = [line.strip() for line in sample.splitlines() if line.strip()]
    seen = [line.strip() for line in actual.splitlines() if line.strip()]
    if _fits(wanted, seen):
        return None
    for number in range(1, len(wanted) + 1):
        if not _fits([*wanted[:number], "…"], seen):
            return wanted[number - 1]
    return "(the end: more output than the sample)"


def test_every_block_says_how_it_is_checked() -> None:
    unmarked = [str(b) for b in blocks() if b.marker is None]
    assert not unmarked, f"blocks without a <!-- doc: ... --> marker: {unmarked}"


def test_the_sample_matcher_can_fail() -> None:
    assert matches("a\n…\nc …\n", "a\nb\nb\nc d\n") is None
    assert matches("a\nc …\n", "a\nb\nc d\n") == "c …"
    assert matches("a\n", "a\nb\n") is not None


def _policy_dir(tmp_path: Path, block: Block) -> Path:
    directory = tmp_path / "policy"
    directory.mkdir(exist_ok=True)
    for listed in (ROOT / "policies").glob("*.txt"):
        shutil.copy(listed, directory / listed.name)
    (directory / "readme.yaml").write_text(block.text, encoding="utf-8")
    return directory


def _hostwall(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}
    return subprocess.run([sys.executable, "-m", "hostwall", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=COMMAND_TIMEOUT * 6, check=False)


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "policy"], ids=str)
def test_policy_blocks_validate(tmp_path: Path, block: Block) -> None:
    result = _hostwall("validate", str(_policy_dir(tmp_path, block)))
    assert result.returncode == 0, f"{block}: {result.stderr}"


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "ruleset"], ids=str)
def test_the_ruleset_listing_is_what_the_kernel_lists(lab: Lab, tmp_path: Path, block: Block) -> None:
    policy = _policy_dir(tmp_path, the_policy_block())
    applied = _hostwall("--netns", lab.server, "--policy-dir", str(policy), "--state-dir", str(tmp_path / "state"),
                        "apply")
    assert applied.returncode == 0, applied.stderr
    listing = run_nft(lab.server, "list", "table", "inet", "hostwall").stdout
    assert matches(block.text, listing) is None, f"{block}: no longer matches at {matches(block.text, listing)!r}"


@pytest.mark.parametrize("block", [b for b in blocks() if (b.marker or "").startswith("output ")], ids=str)
def test_sample_outputs_match_the_command(journald: Journald, block: Block) -> None:
    assert block.marker is not None
    words = shlex.split(block.marker.removeprefix("output "))
    assert words[0] == "hostwall", f"{block}: only hostwall commands are run"
    result = _hostwall(*words[1:])
    assert result.returncode == 0, f"{block}: {result.stderr}"
    assert matches(block.text, result.stdout) is None, \
        f"{block}: the output no longer matches at {matches(block.text, result.stdout)!r}:\n{result.stdout}"


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "usage"], ids=str)
def test_usage_blocks_name_only_real_options(block: Block) -> None:
    for line in block.text.splitlines():
        words = [w for w in shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " ")) if w != "sudo"]
        assert words[:1] == ["hostwall"], f"{block}: not a hostwall synopsis: {line}"
        command = next(w for w in words[1:] if not w.startswith("-"))
        result = _hostwall(command, "--help")
        assert result.returncode == 0, f"{block}: {result.stderr}"
        for option in re.findall(r"--[a-z][a-z-]*", line):
            assert option in result.stdout, f"{block}: hostwall {command} has no {option}"


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "journal record"], ids=str)
def test_the_drop_record_sample_has_the_fields_the_agent_writes(block: Block) -> None:
    sample = dict(pair.split("=", 1) for pair in re.findall(r"[A-Z_]+=\S+", block.text.split("\n", 1)[1]))
    message = block.text.split("\n", 1)[0].removeprefix("MESSAGE=")
    packet = PacketSummary(4, sample["HOSTWALL_SRC"], sample["HOSTWALL_DST"], sample["HOSTWALL_PROTO"],
                           int(sample["HOSTWALL_SRC_PORT"]), int(sample["HOSTWALL_DPORT"]))
    drop = Drop(sample["HOSTWALL_SERVICE"], packet, sample["HOSTWALL_IIF"], int(sample["HOSTWALL_GENERATION"]))
    [record] = DropReporter(FloodControl(), lambda: 0.0).observe(drop)
    assert record.message == message
    written = {**record.fields, "MESSAGE_ID": record.message_id, "PRIORITY": str(record.priority),
               "SYSLOG_IDENTIFIER": "hostwall"}
    assert sample == written
    assert sample["MESSAGE_ID"] == MESSAGE_ID_DROP


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "run"], ids=str)
def test_shell_blocks_run(tmp_path: Path, block: Block) -> None:
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")},
                   "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT * 6, check=False)
    assert result.returncode == 0, f"{block}: {result.stderr}"
    if "bashrc" in block.text:  # what the block appended must work in a shell
        completion = subprocess.run(["bash", "-c", "source ~/.bashrc && complete -p hostwall"], env=environment,
                                    capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        assert completion.returncode == 0 and "hostwall" in completion.stdout, completion.stderr


@pytest.mark.parametrize("block", [b for b in blocks() if b.marker == "make"], ids=str)
def test_make_blocks_name_real_targets_and_files(block: Block) -> None:
    for target in re.findall(r"\bmake ([a-z][a-z0-9-]*)", block.text):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT, check=False)
        assert dry.returncode == 0, f"{block}: make {target}: {dry.stderr}"
    for path in re.findall(r"\b((?:tests|scripts|units|policies|vagrant|ansible)/[\w./-]+)", block.text):
        assert (ROOT / path).exists(), f"{block}: {path} does not exist"


@pytest.mark.parametrize("block", [b for b in blocks() if (b.marker or "").startswith("covered by ")], ids=str)
def test_covered_blocks_name_a_test_that_does_it(block: Block) -> None:
    assert block.marker is not None
    covering = ROOT / block.marker.removeprefix("covered by ")
    assert covering.is_file(), f"{block}: {covering} does not exist"
    text = covering.read_text(encoding="utf-8")
    commands = re.findall(r"\b(make [a-z-]+|systemctl [a-z-]+)", block.text)
    missing = [command for command in commands if command.split()[-1] not in text]
    assert not missing, f"{block}: {covering.name} does not do {missing}"


def test_the_quick_start_names_every_package_setup_installs() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    packages = re.findall(r"[a-z0-9][a-z0-9.+-]+", " ".join(re.findall(r"packages\+?=\(([^)]*)\)", setup)))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 1)]
    named = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", quick_start))
    assert packages and not [p for p in packages if p not in named], \
        f"the quick start does not name {[p for p in packages if p not in named]}"
