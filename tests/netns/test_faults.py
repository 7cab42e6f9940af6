"""Faults around apply and rollback: a full or read-only state directory, corrupt
generations, a kernel that refuses the table, a missing libnftables binding.

Each fault must give one clear line and its documented exit code, leave the kernel as
it was, and leave no partial generation behind.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_support import COMMAND_TIMEOUT, Cli, Nft, PolicyWriter

from hostwall.lab import Lab

pytestmark = pytest.mark.root

NETNS_TESTS = Path(__file__).resolve().parent


@pytest.fixture
def small_state_dir(state_dir: Path) -> Iterator[Path]:
    """The state directory on its own 512 KiB tmpfs, unmounted afterwards."""
    state_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "hostwall-test", str(state_dir)],
                   check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    try:
        yield state_dir
    finally:
        subprocess.run(["umount", "-l", str(state_dir)], capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system holding directory; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for _ in range(4096):  # bounded: 4096 x 4 KiB = 16 MiB, far more than the tmpfs holds
            try:
                handle.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            pytest.fail("the tmpfs never filled up")
    return filler


def _leftovers(state_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*")
                  if p.name.startswith(".staging-") or p.name.endswith(".tmp"))


def _one_line(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("hostwall: "), result.stderr
    assert all(text in lines[0] for text in texts), lines[0]


def test_a_full_state_directory_fails_apply_before_the_kernel(
    lab: Lab, small_state_dir: Path, write_policy: PolicyWriter, hostwall: Cli, nft: Nft
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32"]})
    assert hostwall("apply").returncode == 0
    kernel = nft("list", "table", "inet", "hostwall").stdout
    generations = sorted(os.listdir(small_state_dir / "generations"))
    current = (small_state_dir / "current.json").read_bytes()
    blobs = sorted(os.listdir(small_state_dir / "blobs"))

    filler = _fill(small_state_dir)
    write_policy({"https": [f"{lab.denied.ipv4}/32", "192.0.2.0/24"], "postgres": ["198.51.100.0/24"]})
    _one_line(hostwall("apply"), 6, "disk full")
    assert nft("list", "table", "inet", "hostwall").stdout == kernel
    assert sorted(os.listdir(small_state_dir / "generations")) == generations
    assert (small_state_dir / "current.json").read_bytes() == current
    assert _leftovers(small_state_dir) == []

    assert sorted(os.listdir(small_state_dir / "blobs")) == blobs, "the failed apply left blobs behind"

    filler.unlink()
    result = hostwall("apply", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation"] == 2
    assert nft("list", "table", "inet", "hostwall").stdout != kernel


def test_a_read_only_state_directory_fails_apply_before_the_kernel(
    lab: Lab, small_state_dir: Path, write_policy: PolicyWriter, hostwall: Cli, nft: Nft
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32"]})
    assert hostwall("apply").returncode == 0
    kernel = nft("list", "table", "inet", "hostwall").stdout
    subprocess.run(["mount", "-o", "remount,ro", str(small_state_dir)], check=True, capture_output=True,
                   timeout=COMMAND_TIMEOUT)
    try:
        write_policy({"https": [f"{lab.denied.ipv4}/32"]})
        _one_line(hostwall("apply"), 6, "Read-only file system")
        assert nft("list", "table", "inet", "hostwall").stdout == kernel
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_state_dir)], check=True, capture_output=True,
                       timeout=COMMAND_TIMEOUT)
    assert sorted(os.listdir(small_state_dir / "generations")) == ["00000001"]


@pytest.mark.parametrize("damage", ["flip a byte of ruleset.json", "truncate ruleset.json",
                                    "truncate a set", "truncate meta.json", "delete ruleset.json"])
def test_a_corrupt_generation_is_reported_and_never_loaded(
    lab: Lab, state_dir: Path, write_policy: PolicyWriter, hostwall: Cli, nft: Nft, damage: str
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32"], "postgres": ["192.0.2.0/24"]})
    assert hostwall("apply").returncode == 0
    write_policy({"https": [f"{lab.denied.ipv4}/32"], "postgres": ["198.51.100.0/24"]},
                 action={"postgres": "reject"})  # a full load: generation 1 is not needed for it
    assert hostwall("apply").returncode == 0
    kernel = nft("list", "table", "inet", "hostwall").stdout

    first = state_dir / "generations" / "00000001"
    target = {"flip a byte of ruleset.json": first / "ruleset.json",
              "truncate ruleset.json": first / "ruleset.json",
              "truncate a set": first / "sets" / "https_v4",
              "truncate meta.json": first / "meta.json",
              "delete ruleset.json": first / "ruleset.json"}[damage]
    data = target.read_bytes()
    target.unlink()  # a new inode: the blob shared with other generations stays intact
    if damage.startswith("flip"):
        target.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage.startswith("truncate"):
        target.write_bytes(data[: len(data) // 2])

    result = hostwall("rollback", "--to", "1")
    _one_line(result, 6, "generation 1")
    assert nft("list", "table", "inet", "hostwall").stdout == kernel, "a corrupt generation reached the kernel"
    status = hostwall("status")
    assert status.returncode == 0, status.stderr


def _patched_cli(tmp_path: Path, patch: str) -> Path:
    script = tmp_path / "patched_hostwall.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(NETNS_TESTS)!r})\n{patch}\n"
                      "from hostwall.cli import main\nmain()\n")
    return script


def _run(script: Path, lab: Lab, policy_dir: Path, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}
    return subprocess.run([sys.executable, str(script), "--netns", lab.server, "--policy-dir", str(policy_dir),
                           "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=environment, check=False)


def test_a_kernel_that_refuses_the_table_gives_one_clear_error(
    lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path, write_policy: PolicyWriter, hostwall: Cli,
    nft: Nft,
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32"]})
    assert hostwall("apply").returncode == 0
    kernel = nft("list", "table", "inet", "hostwall").stdout
    generations = sorted(os.listdir(state_dir / "generations"))

    rejecting = _patched_cli(tmp_path, "import hostwall.nft\nfrom netns_support import RejectingBackend\n"
                                       "hostwall.nft.NftBackend = RejectingBackend")
    write_policy({"https": [f"{lab.denied.ipv4}/32"]}, action={"https": "reject"})
    _one_line(_run(rejecting, lab, policy_dir, state_dir, "apply"), 4, "the kernel rejected the transaction")
    assert nft("list", "table", "inet", "hostwall").stdout == kernel
    assert sorted(os.listdir(state_dir / "generations")) == generations
    assert _leftovers(state_dir) == []

    # Only what the netlink batch does not encode goes through libnftables (per-element
    # counters): that load fails with the binding missing, and leaves the kernel as it was.
    missing = _patched_cli(tmp_path, "sys.modules['nftables'] = None")
    counted = policy_dir / "policy.yaml"
    counted.write_text(counted.read_text().replace("  https:\n", "  https:\n    entry_counters: true\n", 1))
    assert "entry_counters: true" in counted.read_text()
    _one_line(_run(missing, lab, policy_dir, state_dir, "apply"), 4, "nftables Python binding is missing")
    assert nft("list", "table", "inet", "hostwall").stdout == kernel
