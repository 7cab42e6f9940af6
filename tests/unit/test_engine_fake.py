"""Engine against the in-memory kernel: what ends up in the (fake) kernel and on disk."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hostwall.cli.common import Options
from hostwall.compile import compile_policy
from hostwall.engine import Engine
from hostwall.errors import KernelRejected, LockBusy, StateError
from hostwall.fake import FakeBackend, _parse_full_load
from hostwall.kernel import Counter
from hostwall.policy import Policy, load_policy
from hostwall.ruleset import Delta, render_full_load
from hostwall.state import Current, StateDir

FIXED = datetime(2026, 6, 1, tzinfo=UTC)
META = "        owner: platform\n        reason: test\n        review_by: 2027-06-30\n"


def allow(*cidrs: str) -> str:
    return "    allow:\n" + "".join(f"      - cidr: {cidr}\n{META}" for cidr in cidrs)


POLICY_V1 = (
    "services:\n"
    "  https:\n" + allow("203.0.113.45/32", "192.0.2.0/24") + "      - file: lists/partner.txt\n" + META
    + "  postgres:\n" + allow("10.0.1.0/24")
    + "  metrics:\n    ports: [9100]\n" + allow("10.0.9.5/32")
    + "  legacy:\n    ports: [8080]\n" + allow("10.0.8.0/24")
)
# https: one entry replaced, one added; metrics: action changed; legacy: gone; dns: new.
POLICY_V2 = (
    "services:\n"
    "  https:\n" + allow("203.0.113.45/32", "198.51.100.0/24", "2001:db8::/32")
    + "      - file: lists/partner.txt\n" + META
    + "  postgres:\n" + allow("10.0.1.0/24")
    + "  metrics:\n    ports: [9100]\n    action: reject\n" + allow("10.0.9.5/32")
    + "  dns:\n    ports: [53]\n    protocols: [udp]\n" + allow("2001:db8:53::/64")
)
PARTNER_LIST = "# partner ranges\n172.16.5.0/24\n"


class Clock:
    def __init__(self) -> None:
        self.now = FIXED.timestamp()

    def __call__(self) -> float:
        return self.now


class Setup:
    """A policy directory, a state directory and an engine over a fake kernel."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.policy_dir = tmp_path / "policy"
        (self.policy_dir / "lists").mkdir(parents=True)
        (self.policy_dir / "lists" / "partner.txt").write_text(PARTNER_LIST)
        self.backend = FakeBackend()
        self.state = StateDir(tmp_path / "state", clock=self.clock)
        self.engine = Engine(self.backend, self.state, clock=self.clock)

    def policy(self, text: str) -> Policy:
        (self.policy_dir / "policy.yaml").write_text(text)
        return load_policy(self.policy_dir, now=FIXED)

    def generation_dirs(self) -> list[str]:
        return sorted(p.name for p in self.state.generations_dir.iterdir())


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# --- apply --------------------------------------------------------------------------------


def test_first_apply_loads_and_records_generation_one(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    desired = compile_policy(policy)

    result = setup.engine.apply(policy, user="alice", message="OPS-1 first load")

    assert (result.applied, result.generation) == (True, 1)
    assert result.plan.changed and not result.plan.table_present
    assert setup.backend.submitted == 1
    kernel = setup.backend.read_table(elements=True)
    assert kernel is not None
    assert (kernel.generation, kernel.digest) == (1, desired.digest)
    assert kernel.sets is not None
    assert [str(i) for i in kernel.sets["https_v4"]] == [
        "172.16.5.0/24", "192.0.2.0/24", "203.0.113.45/32"
    ]
    assert kernel.sets["https_v6"] == ()

    assert setup.state.current() == Current(
        1, desired.digest, kernel.structure, setup.clock.now, comment=kernel.comment, loaded_by="full",
        counting_since=setup.clock.now,
    )
    assert json.loads((setup.state.path / "current.json").read_text())["generation"] == 1


def test_first_apply_writes_a_complete_generation_directory(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    desired = compile_policy(policy)
    setup.engine.apply(policy, user="alice", message="OPS-1 first load")

    directory = setup.state.generations_dir / "00000001"
    assert setup.generation_dirs() == ["00000001"]
    sets = [f"sets/{name}_v{family}" for name in ("https", "legacy", "metrics", "postgres") for family in (4, 6)]
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()) == [
        "meta.json", "policy/lists/partner.txt", "policy/policy.yaml", "ruleset.json", *sets,
    ]
    # No text: the backend builds the full load from the ruleset, as rollback does.
    assert setup.backend.table == _parse_full_load(render_full_load(desired, 1, setup.clock.now))
    assert (directory / "policy" / "policy.yaml").read_text() == POLICY_V1
    assert (directory / "policy" / "lists" / "partner.txt").read_text() == PARTNER_LIST

    meta = json.loads((directory / "meta.json").read_text())
    assert (meta["number"], meta["user"], meta["message"]) == (1, "alice", "OPS-1 first load")
    assert (meta["created"], meta["digest"]) == (setup.clock.now, desired.digest)
    assert meta["entries"] == desired.entry_count()
    for name, digest in meta["files"].items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest

    generation = setup.state.generation(1)
    assert generation.ruleset() == desired
    assert not generation.has_transaction


def test_second_identical_apply_changes_nothing(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    setup.engine.apply(policy, user="alice", message="first")
    current = (setup.state.path / "current.json").read_bytes()
    table = copy.deepcopy(setup.backend.table)
    setup.clock.now += 3600

    result = setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="again")

    assert (result.applied, result.generation, result.plan.changed) == (False, None, False)
    assert result.plan.summary == "no changes"
    assert setup.backend.submitted == 1
    assert setup.backend.table == table
    assert setup.generation_dirs() == ["00000001"]
    assert (setup.state.path / "current.json").read_bytes() == current


def test_plan_after_an_edit_lists_changes_per_service(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")

    plan = setup.engine.plan(compile_policy(setup.policy(POLICY_V2)))

    assert plan.changed and plan.table_present and not plan.drift
    changes = {c.name: c for c in plan.services}
    assert sorted(changes) == ["dns", "https", "legacy", "metrics"]  # postgres is unchanged
    assert changes["https"].status == "entries"
    assert [str(i) for i in changes["https"].added] == ["198.51.100.0/24", "2001:db8::/32"]
    assert [str(i) for i in changes["https"].removed] == ["192.0.2.0/24"]
    assert changes["metrics"].status == "changed"
    assert changes["metrics"].details == ("action drop -> reject",)
    assert (changes["metrics"].added, changes["metrics"].removed) == ((), ())
    assert changes["dns"].status == "added"
    assert [str(i) for i in changes["dns"].added] == ["2001:db8:53::/64"]
    assert changes["legacy"].status == "removed"
    assert plan.summary == "3 entries to add; 1 to remove; services changed: dns, metrics, legacy"
    assert setup.backend.submitted == 1  # planning changes nothing


def test_applying_the_edit_loads_generation_two(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    policy = setup.policy(POLICY_V2)

    result = setup.engine.apply(policy, user="bob", message="second")

    assert (result.applied, result.generation) == (True, 2)
    kernel = setup.backend.read_table(elements=True)
    assert kernel is not None and kernel.sets is not None
    assert (kernel.generation, kernel.digest) == (2, compile_policy(policy).digest)
    assert "legacy_v4" not in kernel.sets
    assert [str(i) for i in kernel.sets["dns_v6"]] == ["2001:db8:53::/64"]
    assert setup.generation_dirs() == ["00000001", "00000002"]
    current = setup.state.current()
    assert current is not None and current.generation == 2
    assert not setup.engine.plan(compile_policy(policy)).changed


def test_old_generations_are_pruned_but_current_is_kept(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.state.keep = 2
    for cidr in ("10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"):
        setup.engine.apply(setup.policy("services:\n  postgres:\n" + allow(cidr)),
                           user="alice", message=cidr)
    assert setup.generation_dirs() == ["00000002", "00000003"]


# --- kernel rejection -----------------------------------------------------------------------


def test_kernel_rejection_leaves_kernel_and_state_as_before(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    table = copy.deepcopy(setup.backend.table)
    current = (setup.state.path / "current.json").read_bytes()
    setup.backend.reject_next = "Error: Could not process rule: No such file or directory"

    with pytest.raises(KernelRejected, match="Could not process rule"):
        setup.engine.apply(setup.policy(POLICY_V2), user="bob", message="second")

    assert setup.backend.table == table
    assert setup.backend.submitted == 1
    assert setup.generation_dirs() == ["00000001"]  # nothing staged is left behind either
    assert (setup.state.path / "current.json").read_bytes() == current

    # The failure leaves nothing that blocks the next attempt.
    assert setup.engine.apply(setup.policy(POLICY_V2), user="bob", message="retry").generation == 2


# --- the record beside the build -------------------------------------------------------------


class SlowRecord:
    """StateDir.stage, delayed, so that a kernel reached before the record is complete
    would see it unfinished; it notes which thread wrote it and when it finished."""

    def __init__(self, setup: Setup, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.threads: list[threading.Thread] = []
        self.finished = threading.Event()
        stage = setup.state.stage

        def slow_stage(*args: object, **kwargs: object) -> object:
            self.threads.append(threading.current_thread())
            threading.Event().wait(0.2)
            if fail:
                raise StateError("cannot record generation: disk full")
            result = stage(*args, **kwargs)  # type: ignore[arg-type]
            self.finished.set()
            return result

        monkeypatch.setattr(setup.state, "stage", slow_stage)


def test_a_full_load_reaches_the_kernel_only_once_its_generation_is_recorded(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    record = SlowRecord(setup, monkeypatch)
    seen: list[tuple[bool, str]] = []
    submit = FakeBackend.submit

    def checking_submit(backend: FakeBackend, transaction: str) -> None:
        generation = setup.state.generation(1)  # reads and hash-checks the record
        seen.append((record.finished.is_set(), generation.ruleset().digest))
        submit(backend, transaction)

    monkeypatch.setattr(FakeBackend, "submit", checking_submit)
    desired = setup.policy(POLICY_V1)
    result = setup.engine.apply(desired, user="alice", message="first")

    assert result.method == "full"
    assert seen == [(True, compile_policy(desired).digest)]
    # Written beside the build, not by the thread that builds and sends the batch.
    assert [thread is threading.main_thread() for thread in record.threads] == [False]
    assert setup.state.current().generation == 1


def test_a_record_that_fails_sends_nothing_and_leaves_the_state_as_before(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    table = copy.deepcopy(setup.backend.table)
    current = (setup.state.path / "current.json").read_bytes()
    SlowRecord(setup, monkeypatch, fail=True)

    with pytest.raises(StateError, match="disk full"):
        # A change of structure (a service gone, another added): a full load, not a delta.
        setup.engine.apply(setup.policy(POLICY_V2), user="bob", message="second")

    assert setup.backend.submitted == 1
    assert setup.backend.table == table
    assert setup.generation_dirs() == ["00000001"]
    assert (setup.state.path / "current.json").read_bytes() == current


def test_kernel_rejection_of_the_first_load_records_nothing(setup: Setup) -> None:
    setup.backend.reject_next = "nf_tables: table busy"

    with pytest.raises(KernelRejected):
        setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")

    assert setup.backend.table is None
    assert setup.generation_dirs() == []
    assert setup.state.current() is None


# --- status and drift ---------------------------------------------------------------------


def test_status_right_after_apply_is_in_sync_with_counters(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    setup.backend.count("https_dropped", 3, 180)

    status = setup.engine.status()

    assert (status.loaded, status.generation, status.recorded_generation) == (True, 1, 1)
    assert not status.drift
    services = {s.name: s for s in status.services}
    assert sorted(services) == ["https", "legacy", "metrics", "postgres"]
    assert (services["https"].ports, services["https"].action) == ("443/tcp+udp", "drop")
    assert services["https"].entries == 3
    assert services["https"].dropped == Counter(3, 180)
    assert services["https"].accepted == Counter(0, 0)


def test_status_reports_a_table_replaced_behind_hostwalls_back(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    foreign = compile_policy(setup.policy(POLICY_V2))
    setup.backend.submit(render_full_load(foreign, 1, setup.clock.now))

    status = setup.engine.status()

    assert status.loaded and status.generation == 1
    assert any("not generation 1 as recorded" in reason for reason in status.drift.reasons)
    assert any("modified outside hostwall" in reason for reason in status.drift.reasons)


def test_status_reports_set_elements_changed_behind_hostwalls_back(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    assert setup.backend.table is not None
    intruder = copy.deepcopy(setup.backend.table.sets["postgres_v4"][0])
    setup.backend.table.sets["https_v4"] += (intruder,)

    status = setup.engine.status()

    assert status.drift.reasons == ("set https_v4 differs from generation 1: 0 missing, 1 unexpected",)


def test_status_reports_a_missing_table(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    setup.backend.table = None

    status = setup.engine.status()

    assert (status.loaded, status.generation, status.recorded_generation) == (False, None, 1)
    assert status.drift.reasons == ("the hostwall table is missing from the kernel",)
    assert status.services == ()


@pytest.mark.parametrize("full", [True, False])
def test_reassert_loads_the_current_generation_again_over_drift(setup: Setup, full: bool) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    setup.backend.table = None

    result = setup.engine.reassert(1, full=full)

    assert result is not None and result.generation == 1
    assert not setup.engine.status().drift
    assert setup.engine.reassert(1, full=full) is None  # nothing drifts any more: nothing is loaded
    assert setup.backend.submitted == 2


@pytest.mark.parametrize("full", [True, False])
def test_a_drift_seen_before_a_disable_is_not_repaired_over_it(setup: Setup, full: bool) -> None:
    # The agent saw the table gone while a disable was between removing it and recording
    # generation 2; its repair of generation 1 runs once the disable holds no lock.
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    seen = setup.engine.status().drift if full else setup.engine.quick_drift()
    assert not seen
    setup.engine.disable(user="bob", message="OPS-9")
    submitted = setup.backend.submitted

    assert setup.engine.reassert(1, full=full) is None

    assert setup.backend.table is None and setup.backend.submitted == submitted
    current = setup.state.current()
    assert current is not None and (current.generation, current.disabled) == (2, True)


def test_a_drift_seen_from_an_earlier_generation_is_not_repaired_with_it(setup: Setup) -> None:
    # Generation 2 was applied after the drift from generation 1 was seen, and its own
    # table drifts since: loading generation 1 would undo the apply.
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    setup.engine.apply(setup.policy(POLICY_V2), user="bob", message="second")
    setup.backend.table = None
    submitted = setup.backend.submitted

    assert setup.engine.reassert(1) is None

    assert setup.backend.submitted == submitted
    current = setup.state.current()
    assert current is not None and current.generation == 2


def test_status_of_a_fresh_host_is_not_loaded_and_not_drift(setup: Setup) -> None:
    status = setup.engine.status()
    assert (status.loaded, status.recorded_generation, bool(status.drift)) == (False, None, False)


def test_apply_repairs_drift_even_when_the_policy_is_unchanged(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    setup.engine.apply(policy, user="alice", message="first")
    setup.backend.submit(render_full_load(compile_policy(setup.policy(POLICY_V2)), 1, setup.clock.now))

    result = setup.engine.apply(policy, user="alice", message="repair")

    assert result.plan.drift and (result.applied, result.generation) == (True, 2)
    assert result.plan.summary.startswith("repairs drift")
    assert not setup.engine.status().drift


def test_apply_repairs_tampered_elements_behind_an_unchanged_comment(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    setup.engine.apply(policy, user="alice", message="first")
    assert setup.backend.table is not None
    intruder = setup.backend.table.sets["postgres_v4"][0]
    setup.backend.table.sets["https_v4"] += (intruder,)

    result = setup.engine.apply(policy, user="alice", message="repair")

    assert (result.applied, result.generation) == (True, 2)
    kernel = setup.backend.read_table(elements=True)
    assert kernel is not None and kernel.sets is not None
    assert intruder not in kernel.sets["https_v4"]
    assert not setup.engine.status().drift


# --- lock -----------------------------------------------------------------------------------


def test_second_lock_holder_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = StateDir(tmp_path / "state")
    with first.locked(wait=0):
        with pytest.raises(LockBusy) as caught, StateDir(tmp_path / "state").locked(wait=0):
            pytest.fail("the lock was granted twice")
        assert f"PID {os.getpid()}" in str(caught.value)
        assert "--wait" in str(caught.value)
    with StateDir(tmp_path / "state").locked(wait=0):
        pass  # released on exit


def test_lock_wait_gives_up_at_the_deadline_without_sleeping(tmp_path: Path) -> None:
    clock = Clock()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.now += seconds

    state = StateDir(tmp_path / "state", monotonic=clock)
    with state.locked(wait=0):
        started = clock.now
        with pytest.raises(LockBusy), state.locked(wait=1.0, sleep=sleep):
            pytest.fail("the lock was granted twice")
    assert naps and clock.now - started == pytest.approx(1.0, abs=0.06)


def test_apply_while_locked_changes_nothing(setup: Setup) -> None:
    policy = setup.policy(POLICY_V1)
    with setup.state.locked(wait=0), pytest.raises(LockBusy):
        setup.engine.apply(policy, user="alice", message="first")
    assert setup.backend.submitted == 0
    assert setup.generation_dirs() == []


# --- corrupted state ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ruleset.json", "transaction.nft"])
def test_corrupted_generation_file_is_detected_by_hash(setup: Setup, name: str) -> None:
    policy = setup.policy(POLICY_V1)
    ruleset = compile_policy(policy)
    # A generation with its text, as full loads were recorded before they were built from the ruleset.
    setup.state.stage(1, ruleset=ruleset, transaction=render_full_load(ruleset, 1, setup.clock.now),
                      policy_files={}, user="alice", message="first")
    path = setup.state.generations_dir / "00000001" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit, as a failing disk would leave it
    path.write_bytes(bytes(data))
    generation = setup.state.generation(1)

    with pytest.raises(StateError, match=re.escape(f"{name} does not match its recorded hash")):
        generation.ruleset() if name == "ruleset.json" else generation.transaction()


def test_corrupted_meta_is_a_state_error(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    (setup.state.generations_dir / "00000001" / "meta.json").write_text("{not json")

    with pytest.raises(StateError, match=re.escape("generation 1: meta.json is corrupt")):
        setup.state.generation(1)


def test_missing_generation_is_a_state_error(setup: Setup) -> None:
    with pytest.raises(StateError, match=re.escape("generation 9 does not exist")):
        setup.state.generation(9)


def test_corrupted_current_json_is_a_state_error(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    (setup.state.path / "current.json").write_text('{"generation": 1}')

    with pytest.raises(StateError, match=re.escape("current.json is unreadable or corrupt")):
        setup.engine.status()


@pytest.mark.parametrize("command", ["apply", "rollback"])
def test_a_corrupt_pending_json_fails_before_the_kernel_is_touched(setup: Setup, command: str) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="first")
    setup.engine.apply(setup.policy(POLICY_V2), user="alice", message="second")
    table = copy.deepcopy(setup.backend.table)
    (setup.state.path / "pending.json").write_text('{"generation": ')

    with pytest.raises(StateError, match=re.escape("pending.json is unreadable or corrupt")):
        if command == "apply":
            setup.engine.apply(setup.policy(POLICY_V1), user="bob", message="third")
        else:
            setup.engine.rollback(1)
    assert setup.backend.table == table
    assert setup.generation_dirs() == ["00000001", "00000002"]


# --- a plain apply confirms what is pending ------------------------------------------------------


@pytest.mark.parametrize("second", [POLICY_V1, POLICY_V2], ids=["unchanged", "changed"])
def test_a_plain_apply_confirms_a_pending_change_whether_or_not_it_changes_anything(
    setup: Setup, second: str
) -> None:
    setup.engine.apply(setup.policy(POLICY_V2), user="alice", message="base")
    armed = setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="try", confirm_within=60)
    assert armed.pending is not None and setup.state.pending() is not None

    result = setup.engine.apply(setup.policy(second), user="alice", message="")

    assert result.confirmed == armed.pending
    assert result.pending is None and setup.state.pending() is None
    setup.clock.now += 120
    assert not setup.engine.revert_if_unconfirmed(armed.pending.generation)
    assert setup.state.current() is not None
    assert setup.state.current().generation == (result.generation or armed.generation)  # type: ignore[union-attr]


def test_an_unchanged_apply_with_confirm_within_leaves_the_pending_change_armed(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V2), user="alice", message="base")
    armed = setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="try", confirm_within=60)

    result = setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="", confirm_within=60)

    assert result.confirmed is None and result.pending == armed.pending == setup.state.pending()


# --- the element delta's guard ----------------------------------------------------------


class EditedBeforeTheBatch(FakeBackend):
    """Another tool moves the generation marker after hostwall's label check, just before
    the delta batch arrives: the fake's guard (like the kernel's) must refuse the batch."""

    deltas_refused: int = 0

    def apply_delta(self, delta: Delta, now: float) -> None:
        assert self.table is not None
        self.table.marker = 4_000_000
        try:
            super().apply_delta(delta, now)
        except KernelRejected:
            self.deltas_refused += 1
            raise


def test_the_fakes_delta_guard_refuses_a_batch_over_another_marker(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.backend = EditedBeforeTheBatch()
    setup.engine = Engine(setup.backend, setup.state, clock=setup.clock)
    setup.engine.apply(setup.policy(POLICY_V1), user="t", message="base")
    result = setup.engine.apply(setup.policy(POLICY_V1.replace("192.0.2.0/24", "192.0.2.0/25")),
                                user="t", message="one entry narrower")
    assert setup.backend.deltas_refused == 1, "the batch over another marker was not refused"
    assert (result.applied, result.method, result.generation) == (True, "full", 2)
    kernel = setup.backend.read_table(elements=False)
    assert kernel is not None and kernel.marker == 2


def test_the_agents_unchanged_reload_leaves_a_pending_change_to_its_deadline(setup: Setup) -> None:
    """The agent loads the policy on disk at start: the unconfirmed change itself. Were
    that a confirmation, the agent would never revert what nobody confirmed."""
    setup.engine.apply(setup.policy(POLICY_V2), user="alice", message="base")
    armed = setup.engine.apply(setup.policy(POLICY_V1), user="alice", message="try", confirm_within=60)

    result = setup.engine.apply(setup.policy(POLICY_V1), user="hostwall-agent", message="start", operator=False)

    assert result.confirmed is None and setup.state.pending() == armed.pending
    setup.clock.now += 120
    assert armed.pending is not None and setup.engine.revert_if_unconfirmed(armed.pending.generation)


# --- releasing the kernel -----------------------------------------------------------------


class ClosingRecorded(FakeBackend):
    """Records the thread that released it, and lets the test say when close returns."""

    closed_on: str = ""

    def close(self) -> None:
        self.closed_on = threading.current_thread().name
        RELEASE_MAY_END.wait(timeout=30)


RELEASE_MAY_END = threading.Event()


def test_a_command_done_with_the_kernel_releases_it_on_a_daemon_thread(tmp_path: Path) -> None:
    """The wait in close() (an RCU grace period after a commit) must hold up neither the
    command's output nor its exit, and the engine's backend must be released."""
    backend = ClosingRecorded()
    engine = Engine(backend, StateDir(tmp_path / "state"))
    options = Options(None, tmp_path / "policy", tmp_path / "state")
    RELEASE_MAY_END.clear()

    try:
        options.release_kernel(engine)  # returns while close() is still waiting
        releasing = [t for t in threading.enumerate() if t.name == "netlink-release"]
        assert len(releasing) == 1 and releasing[0].daemon and releasing[0].is_alive()
    finally:
        RELEASE_MAY_END.set()
    releasing[0].join(timeout=30)
    assert backend.closed_on == "netlink-release"
