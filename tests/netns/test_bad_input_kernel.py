"""Bad policy input through `apply --netns`: exit 3, one line, kernel and state untouched.

The whole corpus runs at unit level (tests/unit/test_bad_input.py); here a
representative case of each kind goes through the real CLI against a loaded table.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from netns_support import Cli, CliJson, Nft, PolicyWriter

from hostwall.lab import Lab
from hostwall.policy import MAX_POLICY_BYTES

pytestmark = pytest.mark.root

META = "      owner: t\n      reason: t\n      review_by: 2099-01-01\n"


def _entry(cidr: str) -> str:
    return f"services:\n  https:\n    allow:\n    - cidr: {cidr}\n" + META


def state_snapshot(state_dir: Path) -> dict[str, str]:
    """Every file of the state directory and its content hash. The list cache is left out:
    it only ever saves time, and parsing a good list beside a bad file may fill it."""
    snapshot = {}
    for path in sorted(state_dir.rglob("*")):
        relative = str(path.relative_to(state_dir))
        if relative.startswith("cache"):
            continue
        snapshot[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return snapshot


def _files(policy_dir: Path, tmp_path: Path) -> dict[str, Callable[[], None]]:
    def put(name: str, content: str | bytes) -> None:
        (policy_dir / name).write_bytes(content.encode() if isinstance(content, str) else content)

    def big_list() -> None:
        lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(100_000)]
        lines[77_776] = "10.1.2.3/33"
        put("big.txt", "\n".join(lines) + "\n")
        put("a.yaml", _entry("192.0.2.1/32").replace("cidr: 192.0.2.1/32", "file: big.txt"))

    def outside() -> None:
        elsewhere = tmp_path / "elsewhere.yaml"
        elsewhere.write_text(_entry("192.0.2.0/24"))
        (policy_dir / "a.yaml").symlink_to(elsewhere)

    def fifo() -> None:
        os.mkfifo(policy_dir / "pipe.txt")
        put("a.yaml", _entry("192.0.2.1/32").replace("cidr: 192.0.2.1/32", "file: pipe.txt"))

    def huge() -> None:
        put("a.yaml", _entry("192.0.2.1/32"))
        os.truncate(policy_dir / "a.yaml", MAX_POLICY_BYTES + 1)

    return {
        "random bytes": lambda: put("a.yaml", bytes(range(256)) * 8),
        "billion laughs": lambda: put("a.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))),
        "control character": lambda: put("a.yaml", _entry("192.0.2.1/32").replace("owner: t", "owner: \x07")),
        "leading zeros": lambda: put("a.yaml", _entry("010.0.0.1")),
        "mapped IPv6": lambda: put("a.yaml", _entry("::ffff:192.0.2.1")),
        "newline in a service name": lambda: put("a.yaml", 'services:\n  "metrics\\n":\n    ports: [9100]\n'),
        "port 65536": lambda: put("a.yaml", "services:\n  metrics:\n    ports: [65536]\n"),
        "not UTF-8": lambda: put("a.yaml", _entry("192.0.2.1/32").replace("reason: t", "reason: \xe9").encode(
            "latin-1")),
        "a bad line among 100k": big_list,
        "symlink out of the directory": outside,
        "FIFO list": fifo,
        "over the size limit": huge,
    }


def test_bad_input_never_reaches_the_kernel_or_the_state_directory(
    lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path, write_policy: PolicyWriter,
    hostwall: Cli, cli_json: CliJson, nft: Nft,
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32"], "postgres": [f"{lab.allowed.ipv4}/32"]})
    assert hostwall("apply").returncode == 0
    kernel = nft("list", "ruleset").stdout
    state = state_snapshot(state_dir)

    failures = []
    for name, make in _files(policy_dir, tmp_path).items():
        for old in policy_dir.iterdir():
            old.unlink()
        make()
        result = hostwall("apply")
        lines = result.stderr.splitlines()
        if result.returncode != 3 or len(lines) != 1 or not lines[0].startswith(f"hostwall: {policy_dir}/"):
            failures.append(f"{name}: rc={result.returncode} stderr={result.stderr[:300]!r}")
        if nft("list", "ruleset").stdout != kernel:
            failures.append(f"{name}: the kernel changed")
        if state_snapshot(state_dir) != state:
            failures.append(f"{name}: the state directory changed")
    assert failures == []

    code, document = cli_json("apply")  # the last case, as JSON
    assert (code, document["kind"], document["exit_code"]) == (3, "PolicyError", 3), document
    assert nft("list", "ruleset").stdout == kernel
