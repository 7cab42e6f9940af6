"""Orchestration: plan, apply, status. Every side effect comes in through the constructor."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from msgspec import Struct
from msgspec.structs import replace

from hostwall.cidr import Interval
from hostwall.clock import now as wall_now
from hostwall.compile import compile_policy
from hostwall.errors import KernelError, KernelRejected, StateError
from hostwall.kernel import Backend, Counter, KernelTable
from hostwall.plan import Drift, Plan, detect_drift, diff_rulesets, make_plan
from hostwall.policy import Entries, Policy
from hostwall.ruleset import Delta, Ruleset, ServiceRules, element_delta, render_removal
from hostwall.state import Current, Pending, StateDir


class ApplyResult(Struct, frozen=True):
    plan: Plan
    generation: int | None  # None when nothing was applied
    applied: bool
    pending: Pending | None = None
    method: str | None = None  # "delta" (element batch) or "full" (whole table)
    confirmed: Pending | None = None  # the pending change this plain apply confirmed


# Measured per-element costs of the two ways to change the kernel (see tests/bench):
# a full load pays for every element of the table, a delta only for what changed.
FULL_LOAD_FIXED_S = 0.010
FULL_LOAD_PER_ELEMENT_S = 6e-6
DELTA_FIXED_S = 0.002
DELTA_PER_ELEMENT_S = 25e-6


def delta_is_cheaper(changed_elements: int, total_elements: int) -> bool:
    delta = DELTA_FIXED_S + DELTA_PER_ELEMENT_S * changed_elements
    full = FULL_LOAD_FIXED_S + FULL_LOAD_PER_ELEMENT_S * total_elements
    return delta < full


class RollbackResult(Struct, frozen=True):
    generation: int
    previous: int | None
    replayed: bool  # True: the stored text byte for byte; False: rendered from the recorded ruleset
    pending: Pending | None = None
    # Why it was rendered: "expiring entries" (stored timeouts are relative to the old
    # load) or "element delta" (that generation reached the kernel as a delta, no text).
    rendered_because: str | None = None


class DisableResult(Struct, frozen=True):
    generation: int  # the disable generation: new, or the one already in force
    previous: int | None  # the generation that was loaded before, None when none was
    changed: bool  # False when hostwall was already disabled


class ServiceStatus(Struct, frozen=True):
    name: str
    ports: str
    action: str
    entries: int
    accepted: Counter
    dropped: Counter


class Status(Struct, frozen=True):
    loaded: bool
    generation: int | None
    recorded_generation: int | None
    drift: Drift
    services: tuple[ServiceStatus, ...]
    pending: Pending | None = None
    expired: tuple[ExpiredEntry, ...] = ()
    disabled: bool = False  # `hostwall disable` removed the table on purpose


class ExpiredEntry(Struct, frozen=True):
    """An element the loaded generation gave a timeout that has since run out."""

    service: str
    interval: Interval
    expired_at: float


class _Beside:
    """work in a thread of its own, started at once; wait() joins it and raises what it raised.
    concurrent.futures does the same, but importing it takes about 14 ms of every apply."""

    def __init__(self, work: Callable[[], object]) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name="hostwall-record")
        self._thread.start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - raised again by wait(), in the caller's thread
            self._error = error

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _expired(recorded: Ruleset | None, now: float) -> tuple[ExpiredEntry, ...]:
    if recorded is None:
        return ()
    return tuple(
        ExpiredEntry(service.name, interval, interval.expires)
        for service in recorded.services
        for family in (4, 6)
        if service.has_timeouts(family)
        for interval in service.intervals(family)
        if interval.expires <= now
    )


def policy_sources(policy: Policy) -> dict[str, bytes]:
    """The files that produced a policy, keyed by a path relative to their common folder.

    A ``file:`` list is recorded with the bytes that were compiled, not read again.
    """
    return _policy_sources(policy)[0]


def _policy_sources(policy: Policy) -> tuple[dict[str, bytes], dict[str, str]]:
    """policy_sources, and the sha256 of the file: lists among them (known from loading)."""
    names = {str(p) for p in policy.files}
    loaded: dict[str, bytes] = {}
    hashes: dict[str, str] = {}
    for service in policy.services:
        if isinstance(service.entries, Entries):
            loaded.update((part.path, part.data) for part in service.entries.lists)
            hashes.update((part.path, part.sha256) for part in service.entries.lists)
            names.update(e.origin.file for e in service.entries.inline)
        else:
            names.update(e.origin.file for e in service.entries)
    names.update(loaded)
    # What was parsed, not what the path holds now: an editor may have replaced the
    # file since, and the generation must record the text its ruleset came from.
    loaded = {**policy.sources, **loaded}
    names.update(e.origin.file for e in policy.expired)
    paths = {Path(name) for name in names}
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in paths])) if paths else Path("/")
    sources, known = {}, {}
    for path in sorted(paths):
        name = str(path.resolve().relative_to(root))
        try:
            sources[name] = loaded[str(path)] if str(path) in loaded else path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read {path} to record it: {exc.strerror}") from exc
        if str(path) in hashes:
            known[name] = hashes[str(path)]
    return sources, known


class Engine:
    def __init__(
        self,
        backend: Backend,
        state: StateDir,
        clock: Callable[[], float] = wall_now,
        spawn_reverter: Callable[[Pending], None] | None = None,
    ) -> None:
        self._backend = backend
        self._state = state
        self._clock = clock
        self._spawn_reverter = spawn_reverter

    def close(self) -> None:
        """Release the backend's hold on the kernel; the engine is not used after."""
        self._backend.close()

    def _recorded(self, current: Current | None) -> Ruleset | None:
        if current is None:
            return None
        try:
            return self._state.generation(current.generation).ruleset()
        except StateError:
            return None

    def plan(self, desired: Ruleset) -> Plan:
        now = self._clock()
        kernel = self._backend.read_table(elements=True)
        current = self._state.current()
        recorded = self._recorded(current)
        drift = detect_drift(kernel, current, recorded, now)
        previous = recorded if recorded is not None and kernel is not None and not drift else None
        return make_plan(desired, kernel, previous, drift, now)

    def apply(
        self,
        policy: Policy,
        *,
        user: str,
        message: str,
        dry_run: bool = False,
        wait: float = 0.0,
        confirm_within: float | None = None,
        guard: Callable[[Ruleset], None] | None = None,
        operator: bool = True,
    ) -> ApplyResult:
        """guard sees the ruleset before anything is loaded and may refuse it by raising
        (the lock-out check). operator: an operator's apply, which confirms a pending
        change even when it changes nothing; the agent's reloads are not, or its start
        would confirm the very change it must revert."""
        desired = compile_policy(policy)
        if dry_run:
            return ApplyResult(self.plan(desired), None, False)
        if guard is not None:
            guard(desired)
        with self._state.locked(wait):
            now = self._clock()
            before = self._state.current()
            # Read before the kernel is touched: a corrupt pending.json must fail the
            # apply while the previous ruleset is still loaded, not after.
            earlier = self._state.pending()
            recorded = self._trusted_record(before)
            if recorded is not None and recorded.digest != desired.digest:
                # The kernel's labels match the record, so the record says what it holds
                # without reading every element back; the delta's guard and the kernel's
                # refusal to delete a missing element catch what the labels cannot.
                plan = Plan(True, True, Drift(), diff_rulesets(recorded, desired))
            else:
                # Nothing to change by the record: verify every element before saying so,
                # since an element added or removed by hand leaves the labels as they were.
                plan = self.plan(desired)
                if not plan.changed:
                    # The operator who runs a plain apply is evidently still there, whether
                    # or not it changes anything: it confirms what is pending.
                    confirmed = None
                    if earlier is not None and confirm_within is None and operator:
                        self._state.clear_pending()
                        confirmed = earlier
                    return ApplyResult(plan, None, False, pending=earlier if confirmed is None else None,
                                       confirmed=confirmed)
            number = self._state.next_number()
            # Any drift means the record no longer describes the kernel: full load.
            delta_base = recorded if recorded is not None and not plan.drift else None
            delta = self._cheaper_delta(number, desired, before, delta_base, now)
            sources, known_hashes = _policy_sources(policy)

            def stage(transaction: str | None) -> None:
                self._state.stage(number, ruleset=desired, transaction=transaction, policy_files=sources,
                                  user=user, message=message, known_hashes=known_hashes)

            try:
                method = self._load(number, desired, delta, before, now, stage)
            except KernelError:
                self._state.discard(number)
                raise
            pending = self._arm_or_clear_confirmation(number, before, earlier, confirm_within)
            self._state.prune()
            confirmed = earlier if earlier is not None and confirm_within is None else None
            return ApplyResult(plan, number, True, pending, method, confirmed)

    def _trusted_record(self, current: Current | None) -> Ruleset | None:
        """The recorded ruleset, when the kernel's comment, structure and generation marker
        all say it is what the kernel holds (a cheap check: no elements are read)."""
        if current is None or current.disabled:
            return None
        snapshot = self._backend.read_table(elements=False)
        if snapshot is None or detect_drift(snapshot, current, None, self._clock()):
            return None
        return self._recorded(current)

    @staticmethod
    def _cheaper_delta(
        number: int, desired: Ruleset, before: Current | None, recorded: Ruleset | None, now: float
    ) -> Delta | None:
        """The element delta from the recorded generation, when it beats a full load."""
        if before is None or recorded is None or recorded.structure() != desired.structure():
            return None
        delta = element_delta(recorded, desired, before.generation, number, now)
        return delta if delta_is_cheaper(delta.size(), desired.entry_count()) else None

    def _load(
        self,
        number: int,
        desired: Ruleset,
        delta: Delta | None,
        before: Current | None,
        now: float,
        stage: Callable[[str | None], None],
    ) -> str:
        """Record generation number (stage), then put it in the kernel: as delta when
        given, else (or when the kernel refuses the delta) as a full load. Returns
        "delta" or "full".

        A delta generation is recorded without a transaction text: rendering a 100k set
        costs more than the whole delta, and rollback renders it from the ruleset.
        """
        if delta is not None and before is not None:
            stage(None)
            try:
                self._backend.apply_delta(delta, now)
            except KernelRejected:
                # The kernel no longer holds what the record says (an element expired
                # early, a concurrent edit): the batch was refused whole, so a full
                # load from the same generation repairs everything. It is recorded
                # again below, with its text.
                self._state.discard(number)
            else:
                self._state.set_current(replace(
                    before, generation=number, digest=desired.digest, applied=now, loaded_by="delta",
                ))
                return "delta"
        # Recorded without its text as well: the backend builds the load from the ruleset
        # (nftload), and rendering 100k elements as text would cost more than sending them.
        # The record waits on the disk (fsync) while the batch is built, so it is written
        # beside the building, and the kernel gets the batch only once it is complete.
        recording = _Beside(lambda: stage(None))
        try:
            self._backend.load(desired, number, now, before_commit=recording.wait)
        finally:
            recording.wait()
        self._record_loaded(number, desired)
        return "full"

    def _arm_or_clear_confirmation(
        self, number: int, before: Current | None, earlier: Pending | None, confirm_within: float | None
    ) -> Pending | None:
        """A plain change while one is pending confirms it (the operator is evidently still
        there); a new confirm-within change keeps reverting to the last confirmed one."""
        if confirm_within is None:
            if earlier is not None:
                self._state.clear_pending()
            return None
        revert_to = earlier.revert_to if earlier else (before.generation if before else None)
        pending = Pending(number, revert_to, self._clock() + confirm_within)
        self._state.set_pending(pending)
        if self._spawn_reverter is not None:
            self._spawn_reverter(pending)
        return pending

    def rollback(
        self,
        to: int | None,
        *,
        wait: float = 0.0,
        confirm_within: float | None = None,
        guard: Callable[[Ruleset], None] | None = None,
    ) -> RollbackResult:
        with self._state.locked(wait):
            current = self._state.current()
            target = to if to is not None else self._previous_number(current)
            return self._roll_back(target, current, confirm_within, guard)

    def reassert(self, generation: int, *, wait: float = 0.0, full: bool = True) -> RollbackResult | None:
        """Load the current generation again over a kernel that drifted from it, as
        rollback to it does; None, doing nothing, when under the state lock it is no
        longer the current generation or the kernel no longer drifts from it. A drift
        seen without the lock may be another command's work in progress (a disable or an
        apply between its change to the kernel and its record), which a repair must not
        undo. full: check every element again (status), not only the labels."""
        with self._state.locked(wait):
            current = self._state.current()
            if current is None or current.generation != generation:
                return None
            if not (self.status().drift if full else self.quick_drift()):
                return None
            return self._roll_back(generation, current, None, None)

    def _roll_back(self, target: int, current: Current | None, confirm_within: float | None,
                   guard: Callable[[Ruleset], None] | None) -> RollbackResult:
        earlier = self._state.pending()
        if guard is not None:
            guard(self._state.generation(target).ruleset())
        rendered_because = self._load_generation(target)
        pending = self._arm_or_clear_confirmation(target, current, earlier, confirm_within)
        return RollbackResult(target, current.generation if current else None, rendered_because is None,
                              pending, rendered_because)

    def _load_generation(self, number: int) -> str | None:
        """Load a recorded generation: None when its stored text was replayed byte for
        byte, else why it was rendered from its recorded (hash-verified) ruleset."""
        generation = self._state.generation(number)
        ruleset = generation.ruleset()
        if generation.meta.disabled:
            self._backend.submit(generation.transaction())
            self._record_disabled(number, ruleset)
            return None
        because = None
        if any(s.has_timeouts(4) or s.has_timeouts(6) for s in ruleset.services):
            # Stored timeouts are relative to the original load; replaying them would
            # extend expiring entries.
            because = "expiring entries"
        elif not generation.has_transaction:
            # It reached the kernel as an element delta or as a full load built from the
            # ruleset. Without timeouts the load depends on nothing but the ruleset and
            # the number: what a full load of this generation submits.
            because = "recorded without text"
        if because is None:
            self._backend.submit(generation.transaction())
        else:
            self._backend.load(ruleset, number, self._clock())
        self._record_loaded(number, ruleset)
        return because

    def _previous_number(self, current: Current | None) -> int:
        if current is None:
            raise StateError("nothing to roll back to: no generation is recorded as loaded")
        earlier = [n for n in self._state.numbers() if n < current.generation]
        if not earlier:
            raise StateError(
                f"generation {current.generation} is the oldest kept; there is nothing before it"
            )
        return earlier[-1]

    def disable(self, *, user: str, message: str, wait: float = 0.0) -> DisableResult:
        """Remove the table, recorded as a generation of its own: rollback (or the
        confirm-within revert of a later change) can return to it or from it."""
        with self._state.locked(wait):
            before = self._state.current()
            if before is not None and before.disabled and self._backend.read_table(elements=False) is None:
                return DisableResult(before.generation, None, changed=False)
            number = self._state.next_number()
            empty = Ruleset(services=())
            removal = render_removal()
            self._state.stage(number, ruleset=empty, transaction=removal, policy_files={}, user=user,
                              message=message, disabled=True)
            try:
                self._backend.submit(removal)
                self._record_disabled(number, empty)
            except KernelError:
                self._state.discard(number)
                raise
            # A change awaiting confirmation is superseded: its reverter must not load
            # anything once hostwall is disabled.
            self._state.clear_pending()
            self._state.prune()
            previous = before.generation if before is not None and not before.disabled else None
            return DisableResult(number, previous, changed=True)

    def _record_disabled(self, number: int, ruleset: Ruleset) -> None:
        if self._backend.read_table(elements=False) is not None:
            raise KernelError(f"the kernel still lists a hostwall table after generation {number} removed it; "
                              "another process loaded one")
        self._state.set_current(Current(number, ruleset.digest, "", self._clock(), disabled=True))

    def confirm(self, *, wait: float = 0.0) -> Pending | None:
        with self._state.locked(wait):
            pending = self._state.pending()
            if pending is not None:
                self._state.clear_pending()
            return pending

    def revert_if_unconfirmed(self, generation: int, *, wait: float = 30.0) -> bool:
        """Called at the deadline by the detached reverter (and by the agent): roll back
        to the last confirmed generation unless the change was confirmed or superseded."""
        with self._state.locked(wait):
            pending = self._state.pending()
            if pending is None or pending.generation != generation or self._clock() < pending.deadline:
                return False
            if pending.revert_to is None:
                # The table did not exist before the unconfirmed change: restore that.
                self._backend.submit(render_removal())
                self._state.clear_current()
            else:
                self._load_generation(pending.revert_to)
            self._state.clear_pending()
            return True

    def _record_loaded(self, number: int, ruleset: Ruleset) -> None:
        loaded = self._backend.read_table(elements=False)
        if loaded is None or loaded.generation != number:
            raise KernelError(
                f"the kernel accepted generation {number} but now lists "
                f"{loaded.comment if loaded else 'no hostwall table'}; another process changed it"
            )
        now = self._clock()
        self._state.set_current(
            Current(number, ruleset.digest, loaded.structure, now, comment=loaded.comment, counting_since=now)
        )

    def status(self) -> Status:
        kernel = self._backend.read_table(elements=True)
        current = self._state.current()
        recorded = self._recorded(current)
        now = self._clock()
        drift = detect_drift(kernel, current, recorded, now)
        return Status(
            loaded=kernel is not None,
            generation=kernel.generation if kernel else None,
            recorded_generation=current.generation if current else None,
            drift=drift,
            services=_service_status(kernel, recorded),
            pending=self._state.pending(),
            expired=_expired(recorded, now),
            disabled=bool(current and current.disabled),
        )

    def quick_drift(self) -> Drift:
        """Drift visible in the table's labels (comment, structure, generation marker) and
        its absence; cheap, because no set element is read."""
        snapshot = self._backend.read_table(elements=False)
        return detect_drift(snapshot, self._state.current(), None, self._clock())

    def kernel_table(self) -> KernelTable | None:
        return self._backend.read_table(elements=True)


def _service_status(kernel: KernelTable | None, recorded: Ruleset | None) -> tuple[ServiceStatus, ...]:
    if kernel is None:
        return ()
    names = sorted({name.rsplit("_", 1)[0] for name in kernel.counters})
    result = []
    for name in names:
        service = recorded.service(name) if recorded else None
        sets = kernel.sets or {}
        result.append(ServiceStatus(
            name=name,
            ports=_ports_text(service) if service else "?",
            action=service.action if service else "?",
            entries=len(sets.get(f"{name}_v4", ())) + len(sets.get(f"{name}_v6", ())),
            accepted=kernel.counters.get(f"{name}_accepted", Counter(0, 0)),
            dropped=kernel.counters.get(f"{name}_dropped", Counter(0, 0)),
        ))
    return tuple(result)


def _ports_text(service: ServiceRules) -> str:
    return ",".join(str(p) for p in service.ports) + "/" + "+".join(service.protocols)
