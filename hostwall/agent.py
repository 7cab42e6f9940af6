"""The long-running agent: streams the kernel's drop logs into the journal."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from msgspec import Struct, field
from msgspec.structs import replace

from hostwall import netns
from hostwall.clock import now as wall_now
from hostwall.compile import compile_policy
from hostwall.drops import (
    MESSAGE_ID_AGENT,
    MESSAGE_ID_CHANGE,
    MESSAGE_ID_DRIFT,
    MESSAGE_ID_POLICY,
    MESSAGE_ID_VERIFY,
    PRIORITY_NOTICE,
    PRIORITY_WARNING,
    Drop,
    DropReporter,
    Record,
    lost_record,
    origin_of,
    reverted_record,
)
from hostwall.engine import Engine
from hostwall.errors import HostwallError, PolicyError
from hostwall.kernel import Counter
from hostwall.nflog import LoggedPacket, ReadResult
from hostwall.packet import PacketError, decode
from hostwall.plan import Drift
from hostwall.policy import BUILTIN_SERVICES, Policy, Service, Settings
from hostwall.state import HEARTBEAT_SECONDS, AgentState, StateDir, atomic_write, note_reverted, reverted_digest

if TYPE_CHECKING:
    from hostwall.verify.report import Report


class PacketSource(Protocol):
    def read(self, timeout: float) -> ReadResult: ...


class RecordSink(Protocol):
    def send(self, record: Record) -> None: ...


class InterfaceNames:
    """ifindex -> name inside the namespace the packets arrived in, cached briefly
    (interfaces come and go, and a name lookup is a syscall per packet otherwise)."""

    def __init__(self, netns_name: str | None, clock: Callable[[], float] = time.monotonic,
                 ttl: float = 30.0) -> None:
        self._netns = netns_name
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[int, tuple[str, float]] = {}

    def __call__(self, ifindex: int | None) -> str:
        if ifindex is None:
            return "?"
        cached = self._cache.get(ifindex)
        now = self._clock()
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        try:
            with netns.entered(self._netns):
                name = socket.if_indextoname(ifindex)
        except (OSError, HostwallError):  # interface or namespace gone: keep streaming
            name = f"if{ifindex}"
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[ifindex] = (name, now)
        return name


class StreamStats(Struct):
    packets: int = 0
    records: int = 0
    lost: int = 0
    undecodable: int = 0
    by_service: dict[str, int] = field(default_factory=dict)


class DropStreamer:
    def __init__(
        self,
        source: PacketSource,
        sink: RecordSink,
        reporter: DropReporter,
        interfaces: Callable[[int | None], str],
        generation: Callable[[], int | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        lost_report_seconds: float = 10.0,
    ) -> None:
        self._source = source
        self._sink = sink
        self._reporter = reporter
        self._interfaces = interfaces
        self._generation = generation
        self._clock = clock
        self._lost_report_seconds = lost_report_seconds
        self._lost_unreported = 0
        self._lost_reported_at: float | None = None
        self.stats = StreamStats()

    def step(self, timeout: float) -> None:
        """Reads and records batches (the source bounds their size) for at most about
        timeout seconds, until a read finds nothing. Each batch is recorded before the
        next is read, so memory stays bounded; and while drops keep coming, the agent's
        other duties (which read state files) run once a step, not between every two of
        the kernel's messages."""
        deadline = self._clock() + timeout
        generation: int | None = None
        asked = False
        result = self._source.read(timeout)
        while True:
            self.stats.lost += result.lost
            self._lost_unreported += result.lost
            self._report_lost(at_exit=False)
            if not result.packets:
                break
            if not asked:
                generation, asked = self._generation(), True
            self._record(result.packets, generation)
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            result = self._source.read(remaining)
        self._emit(self._reporter.flush())

    def _record(self, batch: list[LoggedPacket], generation: int | None) -> None:
        for logged in batch:
            origin = origin_of(logged.prefix)
            if origin is None:
                continue  # another tool logging to the same group
            service, reason = origin
            self.stats.packets += 1
            self.stats.by_service[service] = self.stats.by_service.get(service, 0) + 1
            try:
                packet = decode(logged.payload)
            except PacketError:
                self.stats.undecodable += 1
                continue
            drop = Drop(service, packet, self._interfaces(logged.ifindex), generation, reason)
            self._emit(self._reporter.observe(drop))

    def finish(self) -> None:
        self._report_lost(at_exit=True)
        self._emit(self._reporter.flush_all())

    def _report_lost(self, *, at_exit: bool) -> None:
        """The first loss at once, then at most one record per lost_report_seconds with
        the sum: while the socket overflows, nearly every bounded read sees a gap."""
        if not self._lost_unreported:
            return
        now = self._clock()
        if at_exit or self._lost_reported_at is None or now - self._lost_reported_at >= self._lost_report_seconds:
            self._emit([lost_record(self._lost_unreported, self.stats.lost)])
            self._lost_unreported, self._lost_reported_at = 0, now

    def _emit(self, records: list[Record]) -> None:
        for record in records:
            self._sink.send(record)
            self.stats.records += 1


def run_streamer(streamer: DropStreamer, stop: threading.Event, poll: float = 0.2) -> None:
    """Until stop is set; each read waits at most poll seconds, so stop is seen quickly."""
    try:
        while not stop.is_set():
            streamer.step(poll)
    finally:
        streamer.finish()


# --- the agent as a service ----------------------------------------------------------------


def closed_policy() -> Policy:
    """Built-in services with no allow entry: what fail-closed means. Loopback still passes."""
    services = tuple(
        Service(name, builtin.ports, builtin.protocols, "drop", (), "built-in")
        for name, builtin in sorted(BUILTIN_SERVICES.items())
    )
    return Policy(services=services, settings=Settings(), files=(), expired=())


class AgentSettings(Struct, frozen=True):
    full_check_seconds: float = 60.0  # every element compared with the record
    metrics_file: Path | None = None
    metrics_seconds: float = 15.0
    stall_watchdog_after: float | None = None  # test hook: stop pinging the watchdog


DEFAULT_AGENT_SETTINGS = AgentSettings()


class Notifications(Protocol):
    watchdog_interval: float | None

    def ready(self, status: str) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...


class ChangeEvents(Protocol):
    def changed(self, timeout: float = 0.0) -> bool: ...


class AgentCounters(Struct):
    drift_repairs: int = 0
    last_apply: float | None = None
    last_apply_ok: bool = True


class Agent:
    """Keeps the kernel on the policy: converges at start and on reload, enforces
    confirmation deadlines, repairs drift, and streams drop logs. Never removes the
    table when it stops."""

    def __init__(
        self,
        engine: Engine,
        state: StateDir,
        load: Callable[[], Policy],
        notifier: Notifications,
        sink: RecordSink,
        *,
        streamer: DropStreamer | None = None,
        events: ChangeEvents | None = None,
        counters: Callable[[], dict[str, Counter]] | None = None,
        settings: AgentSettings = DEFAULT_AGENT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = wall_now,
        boot_time: float = 0.0,
        verify: Callable[[Policy], Report] | None = None,
    ) -> None:
        self._engine = engine
        self._verify = verify
        self._applied: Policy | None = None  # the policy the last reload loaded, for verify
        self._state = state
        self._load = load
        self._notifier = notifier
        self._sink = sink
        self._streamer = streamer
        self._events = events
        self._counters = counters
        self._settings = settings
        self._clock = clock
        self._wall = wall_clock
        self._boot_time = boot_time
        self._started = clock()
        self._next_watchdog = clock()
        self._next_full_check = clock() + settings.full_check_seconds
        self._next_metrics = clock()
        self._next_heartbeat = clock()
        self._started_wall = wall_clock()
        self.counters = AgentCounters()
        self._last_fault: str | None = None
        self._last_fault_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        def converge() -> None:
            reverted_now = self._revert_unconfirmed_from_before_boot()
            self._converge("start", respect_reverted=True, skip_policy=reverted_now)

        self._survive("start", converge)
        self._notifier.ready(self.status_text())
        self._heartbeat(running=True)

    def reload(self) -> None:
        self._notifier.reloading()
        self._applied = None
        self._survive("reload", lambda: self._converge("reload", respect_reverted=False, skip_policy=False))
        if self._verify is not None and self._applied is not None:
            self._verify_reload(self._verify, self._applied)
        self._notifier.ready(self.status_text())

    def stop(self) -> None:
        self._notifier.stopping()
        if self._streamer is not None:
            self._streamer.finish()
        self._heartbeat(running=False)

    def tick(self, poll: float = 0.2) -> None:
        """One turn of the main loop: at most about poll seconds."""
        if self._streamer is not None:
            streamer = self._streamer
            if not self._survive("reading the kernel's drop logs", lambda: streamer.step(poll)):
                time.sleep(poll)  # a broken socket fails at once: do not spin
        elif self._events is None:
            time.sleep(poll)
        now = self._clock()
        self._ping_watchdog(now)
        self._survive("confirmation deadline check", self._enforce_deadline)
        if self._events is not None and self._events.changed(0.0 if self._streamer else poll):
            self._check_drift(full=False)
        if now >= self._next_full_check:
            self._next_full_check = now + self._settings.full_check_seconds
            self._check_drift(full=True)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_SECONDS
            self._heartbeat(running=True)
        if self._settings.metrics_file is not None and now >= self._next_metrics:
            self._next_metrics = now + self._settings.metrics_seconds
            self._survive("writing metrics", self.write_metrics)

    def _survive(self, what: str, step: Callable[[], object]) -> bool:
        """Run step; a hostwall error in it is recorded, never fatal. The kernel keeps its
        ruleset whatever happens here, and an agent that exits stops drift repair and
        drop logs too (a corrupt state file would make systemd restart it in a loop).
        While the same error lasts it is recorded once a minute, not on every tick."""
        try:
            step()
        except HostwallError as error:
            message = f"{what} failed, the running firewall stays: {error}"
            now = self._clock()
            if message != self._last_fault or now - self._last_fault_at >= 60.0:
                self._last_fault, self._last_fault_at = message, now
                self._record(message, MESSAGE_ID_CHANGE, PRIORITY_WARNING)
            return False
        return True

    # -- converging --------------------------------------------------------------------

    def _revert_unconfirmed_from_before_boot(self) -> bool:
        """A change still unconfirmed when the machine booted is not trusted."""
        pending = self._state.pending()
        if pending is None:
            return False
        if self._state.pending_since() >= self._boot_time:
            return False  # this boot's change: the deadline still applies
        self._state.set_pending(replace(pending, deadline=0.0))
        return self._enforce_deadline()

    def _enforce_deadline(self) -> bool:
        pending = self._state.pending()
        if pending is None or self._wall() < pending.deadline:
            return False
        if not self._engine.revert_if_unconfirmed(pending.generation):
            return False
        before_boot = pending.deadline == 0.0
        reason = ("unconfirmed when the machine booted" if before_boot else
                  f"not confirmed by {datetime.fromtimestamp(pending.deadline, UTC):%Y-%m-%dT%H:%M:%SZ}")
        self._sink.send(reverted_record(pending.generation, pending.revert_to, reason, "agent"))
        note_reverted(self._state, pending, at=self._wall(), reason=reason, by="agent")
        return True

    def _converge(self, reason: str, *, respect_reverted: bool, skip_policy: bool) -> None:
        current = self._state.current()
        if current is not None and current.disabled:
            # Like `ufw disable`: it lasts across restarts and reboots until an apply.
            self._record(f"hostwall is disabled (generation {current.generation}); not loading the policy on "
                         f"{reason} (run `hostwall apply` to enable it)", MESSAGE_ID_AGENT, PRIORITY_NOTICE,
                         generation=current.generation)
            if self._engine.status().drift:
                self._reassert(current.generation)
            return
        try:
            policy = None if skip_policy else self._load()
        except PolicyError as error:
            policy = None
            self._record(f"policy invalid on {reason}, keeping the running firewall: {error}",
                         MESSAGE_ID_POLICY, PRIORITY_WARNING)
        if policy is not None and respect_reverted and reverted_digest(self._state) == compile_policy(policy).digest:
            self._record("the policy on disk is the one whose unconfirmed change was rolled back; not loading "
                         "it again automatically (run `hostwall apply` to try again)",
                         MESSAGE_ID_POLICY, PRIORITY_WARNING)
            policy = None
        if policy is not None:
            self._apply(policy, f"agent {reason}")
            return
        current = self._state.current()
        if current is None:
            self._apply(closed_policy(), "fail closed: no valid policy and no recorded generation")
            return
        if self._engine.status().drift:
            self._reassert(current.generation)

    def _apply(self, policy: Policy, message: str) -> None:
        self.counters.last_apply = self._wall()
        try:
            result = self._engine.apply(policy, user="hostwall-agent", message=message, wait=30, operator=False)
        except HostwallError as error:
            self.counters.last_apply_ok = False
            self._record(f"{message}: apply failed, the previous ruleset stays: {error}",
                         MESSAGE_ID_CHANGE, PRIORITY_WARNING)
            return
        self.counters.last_apply_ok = True
        self._applied = policy
        if result.applied:
            if result.plan.drift and result.plan.table_present:
                self.counters.drift_repairs += 1
            self._record(f"{message}: loaded generation {result.generation} ({result.method}); "
                         f"{result.plan.summary}", MESSAGE_ID_CHANGE, PRIORITY_NOTICE,
                         generation=result.generation)

    def _verify_reload(self, verify: Callable[[Policy], Report], policy: Policy) -> None:
        generation = self._loaded()
        try:
            report = verify(policy)
        except HostwallError as error:
            self._record(f"verify after reload failed to run: {error}", MESSAGE_ID_VERIFY, PRIORITY_WARNING,
                         generation=generation)
            return
        if report.agrees:
            return
        first = report.mismatches[0]
        fields = {"HOSTWALL_MISMATCHES": str(len(report.mismatches)), "HOSTWALL_SRC": first.probe.address_text,
                  "HOSTWALL_DPORT": str(first.probe.target.port), "HOSTWALL_PROTO": first.probe.target.protocol,
                  "HOSTWALL_EXPECTED": "admitted" if first.probe.expected else "denied",
                  "HOSTWALL_OBSERVED": "admitted" if first.observed else "denied",
                  "HOSTWALL_GENERATION": str(generation)}
        self._sink.send(Record(f"verify after reload: {report.summary()}; first: {first.probe.address_text} to "
                               f"{first.probe.target} {fields['HOSTWALL_EXPECTED']} by the policy, "
                               f"{fields['HOSTWALL_OBSERVED']} by the ruleset ({first.entry})",
                               MESSAGE_ID_VERIFY, PRIORITY_WARNING, fields))

    def _reassert(self, generation: int, *, full: bool = True, seen: Drift | None = None) -> None:
        if self._engine.reassert(generation, wait=30, full=full) is None:
            return  # a command changed the state or the kernel since the drift was seen
        if seen is not None:
            self._record(f"drift: {'; '.join(seen.reasons)}", MESSAGE_ID_DRIFT, PRIORITY_WARNING,
                         generation=generation)
        self.counters.drift_repairs += 1
        self._record(f"the kernel's table drifted from generation {generation}; loaded it again",
                     MESSAGE_ID_DRIFT, PRIORITY_WARNING, generation=generation)

    def _check_drift(self, *, full: bool) -> None:
        try:
            drift = self._engine.status().drift if full else self._engine.quick_drift()
            current = self._state.current()
            if not drift or (self._state.pending() is not None and current is None):
                return
            if current is None:
                self._apply(closed_policy(), "fail closed: the table is gone and nothing is recorded")
                return
            self._reassert(current.generation, full=full, seen=drift)
        except HostwallError as error:
            # Another command may hold the lock for a while; the next check tries again.
            self._record(f"drift check failed: {error}", MESSAGE_ID_DRIFT, PRIORITY_WARNING)

    # -- reporting ---------------------------------------------------------------------

    def _ping_watchdog(self, now: float) -> None:
        interval = self._notifier.watchdog_interval
        stall = self._settings.stall_watchdog_after
        if interval is None or now < self._next_watchdog:
            return
        if stall is not None and now - self._started > stall:
            return
        self._next_watchdog = now + interval
        self._notifier.watchdog()
        self._notifier.status(self.status_text())

    def _loaded(self) -> int | None:
        current = self._state.current()
        return current.generation if current else None

    def status_text(self) -> str:
        try:
            current = self._state.current()
        except HostwallError as error:
            return f"state directory error: {error}"
        if current is None:
            return "no generation loaded"
        if current.disabled:
            return f"disabled by generation {current.generation}: no hostwall table"
        try:
            entries = self._state.generation(current.generation).meta.entries
        except HostwallError:
            entries = 0
        try:
            pending = self._state.pending()
        except HostwallError:
            return f"generation {current.generation} loaded, {entries} entries, pending.json unreadable"
        waiting = f", generation {pending.generation} awaits confirmation" if pending else ""
        return f"generation {current.generation} loaded, {entries} entries{waiting}"

    def _heartbeat(self, *, running: bool) -> None:
        stats = self._streamer.stats if self._streamer is not None else StreamStats()
        try:
            self._state.set_agent(AgentState(os.getpid(), self._started_wall, self._wall(), self.status_text(),
                                             running, stats.packets, stats.lost))
        except HostwallError as error:
            # status then shows a stale heartbeat, which is the truth about this agent.
            self._record(f"cannot record the agent's state: {error}", MESSAGE_ID_AGENT, PRIORITY_WARNING)

    def _record(self, message: str, message_id: str, priority: int, generation: int | None = None) -> None:
        fields = {"HOSTWALL_GENERATION": str(generation)} if generation is not None else {}
        self._sink.send(Record(message, message_id, priority, fields))

    def write_metrics(self) -> None:
        path = self._settings.metrics_file
        if path is None:
            return
        counters = self._counters() if self._counters is not None else {}
        current = self._state.current()
        recorded = self._state.generation(current.generation) if current else None
        lines = [
            "# HELP hostwall_packets_total Packets to protected services, by verdict.",
            "# TYPE hostwall_packets_total counter",
        ]
        samples = sorted(counters.items())
        lines += [f'hostwall_packets_total{{service="{n.rsplit("_", 1)[0]}",verdict="{n.rsplit("_", 1)[1]}"}} '
                  f"{c.packets}" for n, c in samples]
        lines += ["# HELP hostwall_bytes_total Bytes to protected services, by verdict.",
                  "# TYPE hostwall_bytes_total counter"]
        lines += [f'hostwall_bytes_total{{service="{n.rsplit("_", 1)[0]}",verdict="{n.rsplit("_", 1)[1]}"}} '
                  f"{c.bytes}" for n, c in samples]
        if recorded is not None:
            ruleset = recorded.ruleset()
            lines += ["# HELP hostwall_entries Kernel set elements per service.", "# TYPE hostwall_entries gauge"]
            lines += [f'hostwall_entries{{service="{s.name}"}} {len(s.v4) + len(s.v6)}' for s in ruleset.services]
        stats = self._streamer.stats if self._streamer is not None else StreamStats()
        lines += [
            "# HELP hostwall_generation Generation loaded.", "# TYPE hostwall_generation gauge",
            f"hostwall_generation {current.generation if current else 0}",
            "# HELP hostwall_last_apply_timestamp_seconds When the agent last applied.",
            "# TYPE hostwall_last_apply_timestamp_seconds gauge",
            f"hostwall_last_apply_timestamp_seconds {self.counters.last_apply or 0}",
            "# HELP hostwall_last_apply_success Whether the agent's last apply succeeded.",
            "# TYPE hostwall_last_apply_success gauge",
            f"hostwall_last_apply_success {int(self.counters.last_apply_ok)}",
            "# HELP hostwall_drift_repairs_total Times the agent restored its table.",
            "# TYPE hostwall_drift_repairs_total counter",
            f"hostwall_drift_repairs_total {self.counters.drift_repairs}",
            "# HELP hostwall_log_events_lost_total Drop log events the kernel could not deliver.",
            "# TYPE hostwall_log_events_lost_total counter",
            f"hostwall_log_events_lost_total {stats.lost}",
        ]
        atomic_write(path, ("\n".join(lines) + "\n").encode())
