"""Change lifecycle against the real kernel: rollback, commit-confirmed, crashes,
concurrency, element deltas and expiry. Every kernel call goes to the lab's namespace."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from bench.bench_packet import one_interval_set
from netns_support import COMMAND_TIMEOUT, Cli, Nft, output, reach

from hostwall.compile import compile_policy
from hostwall.engine import Engine
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load
from hostwall.state import StateDir

pytestmark = pytest.mark.root

ALLOWED_ONLY = {("allowed", 4, "5432/tcp"): "open", ("denied", 4, "5432/tcp"): "timeout"}
NOBODY = {("allowed", 4, "5432/tcp"): "timeout", ("denied", 4, "5432/tcp"): "timeout"}


def _entry(cidr: str, expires: datetime | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"cidr": cidr, "owner": "lifecycle-tests", "reason": "test",
                             "review_by": "2099-01-01"}
    if expires is not None:
        entry["expires"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return entry


def _write(policy_dir: Path, postgres: list[dict[str, Any]], https: list[dict[str, Any]] | None = None,
           extra_file: list[str] | None = None) -> None:
    for old in policy_dir.iterdir():
        old.unlink()
    services: dict[str, Any] = {"postgres": {"allow": postgres}}
    if https is not None:
        services["https"] = {"allow": https}
    if extra_file is not None:
        (policy_dir / "bulk.txt").write_text("\n".join(extra_file) + "\n")
        services.setdefault("https", {"allow": []})["allow"].append(
            {"file": "bulk.txt", "owner": "bulk", "reason": "generated", "review_by": "2099-01-01"})
    (policy_dir / "policy.yaml").write_text(json.dumps({"services": services}))


def _listing(nft: Nft) -> dict[str, Any]:
    """The table as the kernel lists it, without what changes on its own (handles,
    counters, the remaining time of expiring elements) and the label of the full load the
    table's contents came from (a delta moves the generation marker, not the label)."""
    document = json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout)
    return _normalised(document)


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items()
                if k not in ("handle", "packets", "bytes", "expires", "metainfo", "comment")}
    if isinstance(value, list):
        return [_normalised(v) for v in value if not (isinstance(v, dict) and "metainfo" in v)]
    return value


def _random_cidrs(rng: random.Random, count: int) -> list[str]:
    """Distinct /32s and /24s inside 10.128.0.0/9, none touching the lab's 10.77.x."""
    chosen: set[str] = set()
    while len(chosen) < count:
        network = rng.randrange(0x0A800000, 0x0AFFFF00) & ~0xFF
        octets = ".".join(str(network >> shift & 0xFF) for shift in (24, 16, 8))
        chosen.add(f"{octets}.0/24" if rng.random() < 0.3 else f"{octets}.{rng.randrange(1, 255)}/32")
    return sorted(chosen)


# --- rollback ------------------------------------------------------------------------------


def test_rollback_restores_the_previous_table_exactly_and_its_connectivity(
    lab: Lab, policy_dir: Path, hostwall: Cli, nft: Nft
) -> None:
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")])
    assert hostwall("apply", "-m", "allow the app server").returncode == 0
    first = _listing(nft)
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY

    _write(policy_dir, [_entry("192.0.2.0/24")])
    assert hostwall("apply", "-m", "move to the new subnet").returncode == 0
    assert _listing(nft) != first
    assert reach(lab, NOBODY) == NOBODY

    rolled = output(hostwall("rollback", "--json"))
    # Built again from the recorded (hash-checked) ruleset: full loads keep no text.
    assert (rolled["generation"], rolled["previous"], rolled["replayed"]) == (1, 2, False)
    assert _listing(nft) == first
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    status = output(hostwall("status", "--json"))
    assert status["generation"] == 1 and status["drift"] == []

    listed = output(hostwall("generations", "--json"))
    assert [(g["generation"], g["current"], g["message"]) for g in listed] == [
        (1, True, "allow the app server"), (2, False, "move to the new subnet")]
    changes = output(hostwall("diff", "1", "2", "--json"))["services"]
    assert changes == [{"name": "postgres", "status": "entries", "details": [],
                        "added": ["192.0.2.0/24"], "removed": [f"{lab.allowed.ipv4}/32"]}]


# --- commit-confirmed ----------------------------------------------------------------------


def _apply_in_own_session(command_prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a session leader and SIGKILL its whole session once it returns,
    as a dropped SSH connection would: only a detached reverter can survive that."""
    process = subprocess.Popen([*command_prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):  # nothing left in the session: fine
        os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _cli_prefix(lab: Lab, policy_dir: Path, state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir", str(policy_dir),
            "--state-dir", str(state_dir)]


def _wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


# Long enough for the checks made while a change is pending (CLI runs and a probe that
# waits DENY_TIMEOUT) to end before the deadline, even on a loaded machine.
CONFIRM_WITHIN = 15
REVERT_WAIT = CONFIRM_WITHIN + 60


def _reverters(state_dir: Path) -> list[int]:
    """The detached reverters (spawn_reverter) still running for this state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"revert-unconfirmed" in arguments and str(state_dir).encode() in arguments:
            found.append(int(entry.name))
    return found


def test_unconfirmed_apply_reverts_after_the_cli_session_is_killed(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli
) -> None:
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")])
    assert hostwall("apply").returncode == 0
    _write(policy_dir, [_entry("192.0.2.0/24")])  # locks the allowed client out

    result = _apply_in_own_session(_cli_prefix(lab, policy_dir, state_dir), "apply", "--confirm-within",
                                   str(CONFIRM_WITHIN), "--json")
    assert result.returncode == 0, result.stderr
    applied = json.loads(result.stdout)
    assert applied["generation"] == 2 and applied["pending"]["revert_to"] == 1
    assert reach(lab, NOBODY) == NOBODY
    status = output(hostwall("status", "--json"))
    assert status["pending"]["generation"] == 2

    assert _wait_until(lambda: output(hostwall("status", "--json"))["generation"] == 1, REVERT_WAIT)
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    status = output(hostwall("status", "--json"))
    assert status["pending"] is None and status["drift"] == []


def test_confirm_in_time_keeps_the_new_generation(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli
) -> None:
    _write(policy_dir, [_entry("192.0.2.0/24")])
    assert hostwall("apply").returncode == 0
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")])
    result = _apply_in_own_session(_cli_prefix(lab, policy_dir, state_dir), "apply", "--confirm-within",
                                   str(CONFIRM_WITHIN))
    assert result.returncode == 0, result.stderr
    assert "pending confirmation" in result.stdout
    assert _reverters(state_dir), "no reverter is waiting for the deadline"

    confirmed = output(hostwall("confirm", "--json"))
    assert confirmed == {"confirmed": 2}
    # The reverter wakes at the deadline and must let the confirmed change be.
    assert _wait_until(lambda: not _reverters(state_dir), REVERT_WAIT), "the reverter did not finish"
    status = output(hostwall("status", "--json"))
    assert (status["generation"], status["pending"]) == (2, None)
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY


def test_unconfirmed_first_apply_reverts_to_no_table(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, nft: Nft
) -> None:
    _write(policy_dir, [_entry("192.0.2.0/24")])
    result = _apply_in_own_session(_cli_prefix(lab, policy_dir, state_dir), "apply", "--confirm-within",
                                   str(CONFIRM_WITHIN))
    assert result.returncode == 0, result.stderr
    assert reach(lab, NOBODY) == NOBODY
    assert _wait_until(lambda: nft("list", "tables").stdout.strip() == "", REVERT_WAIT)
    open_again = {("allowed", 4, "5432/tcp"): "open", ("denied", 4, "5432/tcp"): "open"}
    assert reach(lab, open_again) == open_again


# --- crashes and concurrency ---------------------------------------------------------------


def _kernel_state(backend: NftBackend) -> tuple[int | None, dict[str, Any]]:
    table = backend.read_table(elements=True)
    assert table is not None and table.sets is not None
    return table.generation, {name: [str(i) for i in items] for name, items in table.sets.items()}


def _expected_sets(policy_dir: Path) -> dict[str, Any]:
    ruleset = compile_policy(load_policy(policy_dir))
    return {s.set_name(f): [str(i) for i in s.intervals(f)] for s in ruleset.services for f in (4, 6)}


def test_kill_9_during_apply_leaves_old_or_new_in_full(
    lab: Lab, tmp_path: Path, policy_dir: Path, state_dir: Path, hostwall: Cli, backend: NftBackend
) -> None:
    rng = random.Random(20261128)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    _write(old_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=_random_cidrs(rng, 3000))
    _write(new_dir, [_entry("192.0.2.0/24")], extra_file=_random_cidrs(rng, 3000))
    expected = {"old": _expected_sets(old_dir), "new": _expected_sets(new_dir)}
    state = StateDir(state_dir)

    killed_at: list[float] = []
    for trial in range(12):
        source = new_dir if trial % 2 == 0 else old_dir
        process = subprocess.Popen(
            [sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir", str(source),
             "--state-dir", str(state_dir), "apply", "--wait", "20"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.05, 1.2)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=COMMAND_TIMEOUT)
        killed_at.append(delay)

        table = backend.read_table(elements=True)
        if table is None:
            continue  # killed before the first load reached the kernel
        generation, sets = _kernel_state(backend)
        assert sets in (expected["old"], expected["new"]), f"trial {trial}: a mixed table after kill -9"
        current = state.current()
        # The state names the loaded generation, or the one before it while the loaded
        # one's record exists (the kill fell between the kernel's commit and the rename).
        assert current is None or current.generation == generation or (
            generation is not None and (state.generations_dir / f"{generation:08d}").is_dir()
        ), f"trial {trial}: state {current} vs kernel generation {generation}"

    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")])
    final = hostwall("apply", "--wait", "20")
    assert final.returncode == 0, final.stderr
    assert output(hostwall("status", "--json"))["drift"] == []
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY


def test_concurrent_applies_are_serialised(
    lab: Lab, tmp_path: Path, state_dir: Path, hostwall: Cli, backend: NftBackend
) -> None:
    dirs = []
    for index, cidr in enumerate((f"{lab.allowed.ipv4}/32", "192.0.2.0/24")):
        directory = tmp_path / f"p{index}"
        directory.mkdir()
        _write(directory, [_entry(cidr)])
        dirs.append(directory)
    processes = [
        subprocess.Popen([sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir", str(d),
                          "--state-dir", str(state_dir), "apply", "--wait", "30", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in dirs
    ]
    results = [p.communicate(timeout=COMMAND_TIMEOUT) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results
    generations = sorted(json.loads(out)["generation"] for out, _ in results)
    assert generations == [1, 2]
    _, sets = _kernel_state(backend)
    assert sets in (_expected_sets(dirs[0]), _expected_sets(dirs[1]))
    current = StateDir(state_dir).current()
    assert current is not None and current.generation == 2
    assert output(hostwall("status", "--json"))["drift"] == []


def test_lock_holder_is_named_when_waiting_runs_out(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli
) -> None:
    _write(policy_dir, [_entry("192.0.2.0/24")])
    state = StateDir(state_dir)
    with state.locked():
        result = hostwall("apply", "--wait", "0.5")
    assert result.returncode == 7
    assert f"PID {os.getpid()}" in result.stderr


# --- deltas --------------------------------------------------------------------------------


def test_delta_and_full_load_leave_identical_kernel_state(
    lab: Lab, policy_dir: Path, state_dir: Path, backend: NftBackend, nft: Nft
) -> None:
    rng = random.Random(7)
    cidrs = _random_cidrs(rng, 5000)
    engine = Engine(backend, StateDir(state_dir))
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=cidrs)
    assert engine.apply(load_policy(policy_dir), user="t", message="base").method == "full"

    methods = []
    for round_ in range(8):
        removed = set(rng.sample(cidrs, rng.randrange(1, 30)))
        cidrs = sorted((set(cidrs) - removed) | set(_random_cidrs(rng, rng.randrange(1, 30))))
        _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=cidrs)
        policy = load_policy(policy_dir)
        result = engine.apply(policy, user="t", message=f"round {round_}")
        methods.append(result.method)
        after_delta = _listing(nft)
        # The same ruleset, loaded whole under the same generation number.
        backend.submit(render_full_load(compile_policy(policy), result.generation or 0, time.time()))
        assert _listing(nft) == after_delta, f"round {round_}: delta and full load differ"
        engine.apply(policy, user="t", message="re-sync records")  # the full load was behind its back
    assert methods == ["delta"] * 8
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY


def test_delta_refused_by_the_kernel_falls_back_to_a_full_load(
    lab: Lab, policy_dir: Path, state_dir: Path, backend: NftBackend, nft: Nft
) -> None:
    engine = Engine(backend, StateDir(state_dir))
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=["10.200.0.0/24", "10.200.1.1/32"])
    engine.apply(load_policy(policy_dir), user="t", message="base")
    # An element removed by hand: the delta's delete of it fails, the kernel aborts the batch.
    nft("delete", "element", "inet", "hostwall", "https_v4_hosts", "{ 10.200.1.1 }")
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=["10.200.0.0/24"])
    result = engine.apply(load_policy(policy_dir), user="t", message="shrink")
    assert (result.applied, result.method) == (True, "full")
    assert not engine.status().drift
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY


def test_a_table_in_the_earlier_layout_is_converted_by_the_first_refused_delta(
    lab: Lab, policy_dir: Path, state_dir: Path, backend: NftBackend, nft: Nft
) -> None:
    """What an earlier hostwall left: one interval set per family, fib first, and that
    table's fingerprint in the state directory. A delta of ranges still applies to it;
    the first delta with a single address is refused (there is no hash set) and the
    full-load fallback converts the table."""
    engine = Engine(backend, StateDir(state_dir))
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=["10.200.0.0/24"])
    engine.apply(load_policy(policy_dir), user="t", message="base")
    state = StateDir(state_dir)
    current = state.current()
    assert current is not None
    recorded = state.generation(current.generation)
    backend.submit(one_interval_set(render_full_load(recorded.ruleset(), current.generation, recorded.meta.created)))
    earlier = backend.read_table(elements=False)
    assert earlier is not None and earlier.generation == current.generation
    state.set_current(msgspec.structs.replace(current, structure=earlier.structure))
    assert "_hosts" not in nft("list", "table", "inet", "hostwall").stdout
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY

    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")], extra_file=["10.200.0.0/24", "10.201.0.0/24"])
    assert engine.apply(load_policy(policy_dir), user="t", message="a range").method == "delta"
    assert "_hosts" not in nft("list", "table", "inet", "hostwall").stdout

    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32")],
           extra_file=["10.200.0.0/24", "10.201.0.0/24", "10.202.0.9/32"])
    assert engine.apply(load_policy(policy_dir), user="t", message="a single address").method == "full"
    assert "10.202.0.9" in nft("list", "set", "inet", "hostwall", "https_v4_hosts").stdout
    assert "10.201.0.0/24" in nft("list", "set", "inet", "hostwall", "https_v4").stdout
    assert not engine.status().drift
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY


def test_changed_expiry_moves_the_kernel_timeout(
    lab: Lab, policy_dir: Path, state_dir: Path, backend: NftBackend
) -> None:
    engine = Engine(backend, StateDir(state_dir))
    soon = datetime.now(UTC) + timedelta(hours=1)
    later = datetime.now(UTC) + timedelta(days=30)
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32", expires=soon), _entry("192.0.2.0/24")])
    engine.apply(load_policy(policy_dir), user="t", message="contractor")
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32", expires=later), _entry("192.0.2.0/24")])
    result = engine.apply(load_policy(policy_dir), user="t", message="extended")
    assert result.method == "delta"
    table = backend.read_table(elements=True)
    assert table is not None and table.sets is not None
    (element,) = [i for i in table.sets["postgres_v4"] if str(i) == f"{lab.allowed.ipv4}/32"]
    assert element.expires > timedelta(days=29).total_seconds()  # seconds left, as the kernel says


# --- expiry --------------------------------------------------------------------------------


def test_expiring_entry_leaves_the_kernel_without_any_hostwall_process(
    lab: Lab, policy_dir: Path, hostwall: Cli
) -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    _write(policy_dir, [_entry(f"{lab.allowed.ipv4}/32", expires=expires)])
    assert hostwall("apply").returncode == 0  # the CLI has exited: only the kernel is left
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1.5)
    assert reach(lab, NOBODY) == NOBODY
    status = output(hostwall("status", "--json"))
    assert status["drift"] == []  # an element that timed out is what the record expects
    assert [(e["service"], e["cidr"]) for e in status["expired"]] == [("postgres", f"{lab.allowed.ipv4}/32")]


def test_keep_generations_prunes_the_oldest(lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli) -> None:
    for cidr in ("192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32", f"{lab.allowed.ipv4}/32"):
        _write(policy_dir, [_entry(cidr)])
        result = subprocess.run(
            [sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir", str(policy_dir),
             "--state-dir", str(state_dir), "--keep-generations", "2", "apply"],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
        assert result.returncode == 0, result.stderr
    listed = output(hostwall("generations", "--json"))
    assert [(g["generation"], g["current"]) for g in listed] == [(3, False), (4, True)]
    assert reach(lab, ALLOWED_ONLY) == ALLOWED_ONLY
