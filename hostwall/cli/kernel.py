"""Commands that load the kernel or read the generations: plan, apply, rollback,
confirm, status, generations, diff, and the detached reverter."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from msgspec import Struct
from msgspec.structs import replace

from hostwall import clock
from hostwall.cli.common import (
    EXIT_NEEDS_ATTENTION,
    EXIT_OK,
    Options,
    confirm_option,
    emit_json,
    json_option,
    message_option,
    pass_options,
    reports_errors,
    require_privileges,
    wait_option,
)
from hostwall.output import Output
from hostwall.processes import pid_alive as _pid_alive

if TYPE_CHECKING:
    from hostwall.cidr import Interval
    from hostwall.cli.journal import DropsView
    from hostwall.engine import Status
    from hostwall.plan import Plan, ServiceChange
    from hostwall.policy import Policy
    from hostwall.ruleset import Ruleset
    from hostwall.state import AgentState, Pending, Reverted
    from hostwall.verify.report import Report


verify_option = click.option("--verify", "verify_after", is_flag=True,
                             help="Right after loading, run `hostwall verify`; exit 10 when it finds a difference "
                                  "(with --confirm-within, a difference reverts at once).")


def _interval_texts(intervals: Sequence[Interval]) -> list[str]:
    # Loaded by the time a plan exists; a first load's whole sets format from their
    # records (IntervalSet.texts), which `apply --json` of a 125k first load felt.
    from hostwall.cidr import IntervalSet
    from hostwall.plan import Joined

    if isinstance(intervals, Joined | IntervalSet):
        return intervals.texts()
    return [str(interval) for interval in intervals]


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "changed": plan.changed,
        "table_present": plan.table_present,
        "drift": list(plan.drift.reasons),
        "summary": plan.summary,
        "services": [
            {"name": s.name, "status": s.status, "details": list(s.details),
             "added": _interval_texts(s.added), "removed": _interval_texts(s.removed)}
            for s in plan.services
        ],
    }


def _print_plan(out: Output, plan: Plan, limit: int = 20) -> None:
    for reason in plan.drift.reasons:
        out.line(f"drift: {reason}")
    if not plan.changed:
        out.line("no changes: the kernel already holds this policy")
        return
    _print_changes(out, plan.services, limit)
    out.line(f"plan: {plan.summary}")


def _print_changes(out: Output, changes: tuple[ServiceChange, ...], limit: int) -> None:
    """Each service's change, then its entries: added green, removed red on a terminal."""
    for change in changes:
        detail = f" ({'; '.join(change.details)})" if change.details else ""
        out.line(f"service {change.name}: {change.status}{detail}", "bold")
        for sign, items, style in (("+", change.added, "ok"), ("-", change.removed, "error")):
            for interval in items[:limit]:
                out.line(f"  {sign} {interval}", style)
            if len(items) > limit:
                out.line(f"  {sign} ... and {len(items) - limit} more", style)


@click.command(epilog="Example: sudo hostwall plan")
@json_option
@pass_options
@reports_errors
def plan(options: Options, as_json: bool) -> None:
    """Show what apply would change; exit 10 when there are changes."""
    from hostwall.compile import compile_policy

    require_privileges("plan")
    policy = options.policy()
    desired = compile_policy(policy)
    result = options.engine().plan(desired)
    lockout = lockout_warning(options, desired)
    if as_json:
        emit_json({**_plan_json(result), "lockout": lockout})
    else:
        for warning in [*policy.warnings(), *([lockout] if lockout else [])]:
            options.out.warn(warning)
        _print_plan(options.out, result)
    sys.exit(EXIT_NEEDS_ATTENTION if result.changed else EXIT_OK)


def invoking_user() -> str:
    if os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    import getpass

    return getpass.getuser()


def lockout_guard(options: Options, allow_lockout: bool, command: str) -> Callable[[Ruleset], None] | None:
    """A check that refuses a ruleset dropping the SSH session this command runs in, when
    there is one and it reaches the namespace being changed."""
    if allow_lockout:
        return None
    from hostwall.session import find_ssh_session, target_netns

    session = find_ssh_session()
    if session is None:
        return None
    from hostwall.lockout import refuse_lockout

    target = target_netns(options.netns)
    if session.netns is not None and target is not None and session.netns != target:
        return None  # the session arrives in another network namespace than the one changed

    def guard(ruleset: Ruleset) -> None:
        refuse_lockout(ruleset, session, clock.now(), command)

    return guard


def lockout_warning(options: Options, ruleset: Ruleset) -> str | None:
    """What apply would refuse for this ruleset, said by the commands that only look."""
    from hostwall.lockout import WouldLockOut

    guard = lockout_guard(options, False, "apply")
    try:
        if guard is not None:
            guard(ruleset)
    except WouldLockOut as refusal:
        return f"apply would refuse this policy: {refusal.detail}"
    return None


allow_lockout_option = click.option(
    "--allow-lockout", is_flag=True,
    help="Load even if the new ruleset drops the SSH session this command runs in (you have a console).")


@click.command(epilog="Example: sudo hostwall apply -m \"partner-b migrated (OPS-1234)\"")
@click.option("--check", "dry_run", is_flag=True, help="Dry run: show the plan, change nothing.")
@message_option
@wait_option
@confirm_option
@allow_lockout_option
@verify_option
@json_option
@pass_options
@reports_errors
def apply(options: Options, dry_run: bool, message: str, wait: float, confirm_within: float | None,
          allow_lockout: bool, verify_after: bool, as_json: bool) -> None:
    """Validate, compile and load the policy in one atomic transaction; with --check,
    exit 10 when there are changes (like plan)."""
    require_privileges("apply")
    policy = options.policy(write_cache=not dry_run)
    engine = options.engine()
    result = engine.apply(policy, user=invoking_user(), message=message,
                          dry_run=dry_run, wait=wait, confirm_within=confirm_within,
                          guard=lockout_guard(options, allow_lockout, "apply"))
    options.release_kernel(engine)
    if result.applied:
        from hostwall.state import clear_reverted

        clear_reverted(options.state())  # an explicit apply overrides a past rollback
    checked = verified(options, policy, result.pending) if verify_after and not dry_run else None
    # Like plan: a dry run that finds changes needs attention (exit 10).
    exit_code = EXIT_NEEDS_ATTENTION if dry_run and result.plan.changed else EXIT_OK
    if checked is not None and not checked.report.agrees:
        exit_code = EXIT_NEEDS_ATTENTION
    if as_json:
        payload = _plan_json(result.plan)
        payload.update({"applied": result.applied, "generation": result.generation, "method": result.method,
                        "dry_run": dry_run, "warnings": policy.warnings(),
                        "pending": pending_json(result.pending),
                        "confirmed": result.confirmed.generation if result.confirmed else None})
        if checked is not None:
            payload["verify"] = {**checked.report.to_json(), "reverted": checked.reverted}
        emit_json(payload)
        sys.exit(exit_code)
    for warning in policy.warnings():
        options.out.warn(warning)
    if dry_run and not allow_lockout:
        from hostwall.compile import compile_policy

        lockout = lockout_warning(options, compile_policy(policy))
        if lockout:
            options.out.warn(lockout)
    _print_plan(options.out, result.plan)
    if result.applied:
        repaired = " (repaired drift)" if result.plan.drift and result.plan.table_present else ""
        how = "element delta" if result.method == "delta" else "full load"
        options.out.line(f"applied generation {result.generation} ({how}){repaired}")
    if result.confirmed:
        options.out.line(f"confirmed generation {result.confirmed.generation}: a plain apply confirms the "
                         "change that was pending", style="ok")
    if result.pending and not (checked and checked.reverted):
        options.out.line(pending_text(result.pending))
    elif dry_run and result.plan.changed:
        options.out.line("dry run: nothing was applied")
    if checked is not None:
        print_verified(options, checked)
    sys.exit(exit_code)


class Verified(Struct, frozen=True):
    report: Report
    reverted: bool  # the change was pending confirmation and verify failed: reverted at once


def verified(options: Options, policy: Policy, pending: Pending | None) -> Verified:
    """verify after a load; a failed one reverts a change awaiting confirmation now
    rather than at its deadline."""
    from hostwall.cli.verify import run_verify

    report = run_verify(options, policy)
    if report.agrees or pending is None:
        return Verified(report, False)
    from hostwall.state import note_reverted

    state = options.state()
    state.set_pending(replace(pending, deadline=clock.now()))
    reverted = options.engine().revert_if_unconfirmed(pending.generation)
    if reverted:
        reason = "hostwall verify found the loaded ruleset differing from the policy"
        report_reverted(options.netns, pending, reason, "verify")
        note_reverted(state, pending, at=clock.now(), reason=reason, by="verify")
    return Verified(report, reverted)


def print_verified(options: Options, checked: Verified) -> None:
    from hostwall.cli.verify import print_report

    print_report(options, checked.report)
    if checked.reverted:
        options.out.line("verify failed: the unconfirmed change was reverted", style="error")
    if not checked.report.agrees:
        sys.exit(EXIT_NEEDS_ATTENTION)


def pending_json(pending: Pending | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {"generation": pending.generation, "revert_to": pending.revert_to,
            "deadline": datetime.fromtimestamp(pending.deadline, UTC).isoformat(),
            "seconds_left": max(0.0, round(pending.deadline - clock.now(), 1))}


def pending_text(pending: Pending) -> str:
    deadline = datetime.fromtimestamp(pending.deadline, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    target = f"generation {pending.revert_to}" if pending.revert_to else "no hostwall table"
    left = max(0, round(pending.deadline - clock.now()))
    return (f"pending confirmation: generation {pending.generation} reverts to {target} "
            f"at {deadline} (in {left} s) unless `hostwall confirm` runs")


def reverted_json(record: Reverted | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"generation": record.generation, "revert_to": record.revert_to, "reason": record.reason,
            "by": record.by, "reverted_at": None if record.reverted_at is None
            else datetime.fromtimestamp(record.reverted_at, UTC).isoformat()}


def reverted_text(record: Reverted) -> str:
    target = f"generation {record.revert_to}" if record.revert_to is not None else "no hostwall table"
    when = f" at {_utc(record.reverted_at)}" if record.reverted_at is not None else ""
    why = f": {record.reason}" if record.reason else ""
    by = f" (by the {record.by})" if record.by else ""
    return f"reverted{when}: generation {record.generation} rolled back to {target}{why}{by}"


def _status_json(status: Status, agent: AgentView, drops: DropsView) -> dict[str, Any]:
    from hostwall.drops import typed_fields

    return {
        "pending": pending_json(status.pending),
        "loaded": status.loaded,
        "disabled": status.disabled,
        "generation": status.generation,
        "recorded_generation": status.recorded_generation,
        "drift": list(status.drift.reasons),
        "expired": [{"service": e.service, "cidr": str(e.interval),
                     "expired_at": datetime.fromtimestamp(e.expired_at, UTC).isoformat()} for e in status.expired],
        "services": [
            {"name": s.name, "ports": s.ports, "action": s.action, "entries": s.entries,
             "accepted_packets": s.accepted.packets, "accepted_bytes": s.accepted.bytes,
             "dropped_packets": s.dropped.packets, "dropped_bytes": s.dropped.bytes}
            for s in status.services
        ],
        "agent": {"state": agent.state, "detail": agent.detail,
                  **({"pid": agent.record.pid, "status": agent.record.status,
                      "heartbeat": datetime.fromtimestamp(agent.record.heartbeat, UTC).isoformat(),
                      "started": datetime.fromtimestamp(agent.record.started, UTC).isoformat(),
                      "drops_read": agent.record.drops_read, "lost": agent.record.lost}
                     if agent.record else {})},
        "last_drops": None if drops.error else [
            {"time": datetime.fromtimestamp(e.timestamp, UTC).isoformat(), "message": e.message,
             **typed_fields(e.fields)}
            for e in drops.entries],
        "last_drops_error": drops.error,
    }


class AgentView(Struct, frozen=True):
    state: str  # running, stale, stopped, unknown
    detail: str
    record: AgentState | None


# A heartbeat older than this many intervals means the agent is hung or gone.
STALE_HEARTBEATS = 3


def agent_view(record: AgentState | None, now: float, alive: Callable[[int], bool]) -> AgentView:
    if record is None:
        return AgentView("unknown", "no agent has run with this state directory", None)
    age = now - record.heartbeat
    if not record.running:
        return AgentView("stopped", f"stopped {_ago(age)}", record)
    if not alive(record.pid):
        return AgentView("stopped", f"pid {record.pid} is gone (last heartbeat {_ago(age)}; it did not stop "
                         "cleanly)", record)
    from hostwall.state import HEARTBEAT_SECONDS

    if age > STALE_HEARTBEATS * HEARTBEAT_SECONDS:
        return AgentView("stale", f"pid {record.pid} has not reported for {_ago(age, suffix='')}", record)
    return AgentView("running", f"pid {record.pid}, up {_ago(now - record.started, suffix='')}: {record.status}",
                     record)


def _ago(seconds: float, suffix: str = " ago") -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}{suffix}"
    return f"{seconds}s{suffix}"


@click.command(epilog="Example: sudo hostwall status --json")
@click.option("--drops", "drop_count", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many of the last day's drop records to show (0: do not read the journal).")
@json_option
@pass_options
@reports_errors
def status(options: Options, drop_count: int, as_json: bool) -> None:
    """One screen: generation, confirm deadline, per-service entries and counters, drift,
    agent, last drops; exit 10 on drift or no table (unless disabled).
    """
    from hostwall.state import reverted

    require_privileges("status")
    result = options.engine().status()
    agent = agent_view(options.state().agent(), clock.now(), _pid_alive)
    from hostwall.cli.journal import DropsView, last_drops

    drops = last_drops(options.netns, drop_count) if drop_count else DropsView(())
    rolled_back = reverted(options.state())
    if as_json:
        emit_json({**_status_json(result, agent, drops), "reverted": reverted_json(rolled_back)})
        sys.exit(_status_exit(result))
    out = options.out
    if result.disabled and not result.loaded:
        out.line(f"disabled: generation {result.recorded_generation} removed the hostwall table; "
                 "`hostwall apply` (or `hostwall rollback`) enables it again", style="warning")
    elif not result.loaded:
        out.line("not loaded: the kernel has no hostwall table", style="error")
    else:
        out.line(f"generation {result.generation} loaded (recorded: {result.recorded_generation or 'none'})")
    if result.pending:
        out.line(pending_text(result.pending), style="warning")
    if rolled_back:
        out.line(reverted_text(rolled_back), style="warning")
    if result.services:
        out.table(["service", "ports", "action", "entries", "accepted", "dropped"],
                  [[s.name, s.ports, s.action, str(s.entries), str(s.accepted.packets), str(s.dropped.packets)]
                   for s in result.services], right=(3, 4, 5))
    for entry in result.expired:
        stamp = datetime.fromtimestamp(entry.expired_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.line(f"expired: {entry.service} {entry.interval} at {stamp} (left the kernel; "
                 "remove it from the policy)", style="warning")
    for reason in result.drift.reasons:
        out.line(f"drift: {reason}", style="error")
    if result.loaded and not result.drift:
        out.line("in sync: the kernel matches what hostwall wrote", style="ok")
    out.line(f"agent: {agent.state}: {agent.detail}",
             style={"running": "ok", "stale": "error", "stopped": "warning"}.get(agent.state))
    if drops.error:
        out.line(f"last drops: unavailable ({drops.error})", style="muted")
    elif drop_count:
        if not drops.entries:
            out.line("last drops: none in the last 24 hours")
        else:
            out.table(["time", "drop"], [[datetime.fromtimestamp(e.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                                          e.message] for e in drops.entries], title="last drops:")
    sys.exit(_status_exit(result))


def _status_exit(result: Status) -> int:
    """Drift, or no table that was not asked for, needs attention; a disabled hostwall
    is what the operator chose."""
    missing = not result.loaded and not result.disabled
    return EXIT_NEEDS_ATTENTION if result.drift or missing else EXIT_OK


@click.command(epilog="Example: sudo hostwall generations")
@json_option
@pass_options
@reports_errors
def generations(options: Options, as_json: bool) -> None:
    """List the recorded generations, newest last; * marks the loaded one."""
    state = options.state()
    current = state.current()
    items = state.generations()
    if as_json:
        emit_json([{"generation": g.meta.number, "created": datetime.fromtimestamp(g.meta.created, UTC).isoformat(),
                     "user": g.meta.user, "message": g.meta.message, "entries": g.meta.entries,
                     "digest": g.meta.digest, "disabled": g.meta.disabled,
                     "current": bool(current and current.generation == g.meta.number)}
                    for g in items])
        return
    if not items:
        options.out.line(f"no generations recorded in {options.state_dir}")
        return
    loaded = [bool(current and current.generation == g.meta.number) for g in items]
    rows = [["*" if is_loaded else "", str(g.meta.number),
             datetime.fromtimestamp(g.meta.created, UTC).strftime("%Y-%m-%d %H:%M:%SZ"), g.meta.user,
             "disabled" if g.meta.disabled else str(g.meta.entries), g.meta.digest[:12], g.meta.message]
            for g, is_loaded in zip(items, loaded, strict=True)]
    options.out.table(["", "generation", "created", "user", "entries", "sha256", "message"], rows,
                      styles=["ok" if is_loaded else None for is_loaded in loaded], right=(1, 4))


@click.command(epilog="Example: sudo hostwall rollback --to 1 --confirm-within 120")
@click.option("--to", "target", type=click.IntRange(min=1), default=None,
              help="Generation to load (default: the one before the loaded one).")
@wait_option
@confirm_option
@allow_lockout_option
@verify_option
@json_option
@pass_options
@reports_errors
def rollback(options: Options, target: int | None, wait: float, confirm_within: float | None,
             allow_lockout: bool, verify_after: bool, as_json: bool) -> None:
    """Load an earlier generation atomically, exactly as it was submitted."""
    require_privileges("rollback")
    engine = options.engine()
    result = engine.rollback(target, wait=wait, confirm_within=confirm_within,
                             guard=lockout_guard(options, allow_lockout, "rollback"))
    options.release_kernel(engine)
    checked = None
    if verify_after:
        # The expected answers come from the policy that generation was made of.
        stored = options.state().generation(result.generation).path / "policy"
        checked = verified(options, options.policy(stored), result.pending)
    if as_json:
        emit_json({"generation": result.generation, "previous": result.previous,
                    "replayed": result.replayed, "rendered_because": result.rendered_because,
                    "pending": pending_json(result.pending),
                    **({"verify": {**checked.report.to_json(), "reverted": checked.reverted}} if checked else {})})
        if checked is not None and not checked.report.agrees:
            sys.exit(EXIT_NEEDS_ATTENTION)
        return
    how = "stored transaction replayed" if result.replayed else f"rendered again: {result.rendered_because}"
    options.out.line(f"rolled back from generation {result.previous} to {result.generation} ({how})")
    if result.pending and not (checked and checked.reverted):
        options.out.line(pending_text(result.pending))
    if checked is not None:
        print_verified(options, checked)


@click.command(epilog="Example: sudo hostwall confirm")
@wait_option
@json_option
@pass_options
@reports_errors
def confirm(options: Options, wait: float, as_json: bool) -> None:
    """Keep the change applied with --confirm-within (stops the automatic revert)."""
    require_privileges("confirm")
    pending = options.state()
    from hostwall.engine import Engine
    from hostwall.nft import NftBackend

    confirmed = Engine(NftBackend(options.netns), pending).confirm(wait=wait)
    if as_json:
        emit_json({"confirmed": confirmed.generation if confirmed else None})
    elif confirmed:
        options.out.line(f"generation {confirmed.generation} confirmed")
    else:
        options.out.line("nothing to confirm")


@click.command(epilog="Example: sudo hostwall diff 1 2")
@click.argument("old", type=click.IntRange(min=1))
@click.argument("new", type=click.IntRange(min=1))
@json_option
@pass_options
@reports_errors
def diff(options: Options, old: int, new: int, as_json: bool) -> None:
    """What changed between two generations."""
    from hostwall.errors import UsageError
    from hostwall.plan import diff_rulesets

    state = options.state()
    recorded = state.numbers()
    for number in (old, new):
        if number not in recorded:
            kept = f"{recorded[0]}-{recorded[-1]}" if recorded else "none"
            raise UsageError(f"generation {number} does not exist (kept: {kept}; see `hostwall generations`)")
    changes = diff_rulesets(state.generation(old).ruleset(), state.generation(new).ruleset())
    if as_json:
        emit_json({"old": old, "new": new, "services": [
            {"name": c.name, "status": c.status, "details": list(c.details),
             "added": [str(i) for i in c.added], "removed": [str(i) for i in c.removed]} for c in changes]})
        return
    if not changes:
        options.out.line(f"generations {old} and {new} load the same ruleset")
    _print_changes(options.out, changes, limit=50)


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_reverted(netns: str | None, pending: Pending, reason: str, by: str) -> None:
    """One journal record of the rollback; without journald the state directory's
    marker (shown by `status`) still says it."""
    from hostwall.drops import reverted_record
    from hostwall.journal import JournalSink

    sink = JournalSink({"HOSTWALL_NETNS": netns} if netns else None)
    sink.send(reverted_record(pending.generation, pending.revert_to, reason, by))


@click.command("revert-unconfirmed", hidden=True)
@click.argument("generation", type=int)
@pass_options
@reports_errors
def revert_unconfirmed(options: Options, generation: int) -> None:
    """The detached reverter behind --confirm-within: waits for the deadline, then reverts."""
    from hostwall.cli.common import REVERTER_READY

    # Detached for good: the process that started this one reaps it at once, and the
    # one that waits is init's to reap.
    if os.fork() != 0:
        os._exit(0)
    # The command that started this one waits for these words before it returns: said
    # as soon as this code runs, since the deadline is already counting.
    with contextlib.suppress(OSError):
        os.write(sys.stdout.fileno(), REVERTER_READY)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    state = options.state()
    pending = state.pending()
    while pending is not None and pending.generation == generation:
        remaining = pending.deadline - clock.now()
        if remaining <= 0:
            from hostwall.state import note_reverted

            if options.engine().revert_if_unconfirmed(generation):
                reason = f"not confirmed by {_utc(pending.deadline)}"
                report_reverted(options.netns, pending, reason, "reverter")
                note_reverted(state, pending, at=clock.now(), reason=reason, by="reverter")
            return
        time.sleep(min(remaining, 1.0))
        pending = state.pending()


@click.command(epilog="Example: sudo hostwall disable -m \"OPS-1300: tracing a partner's outage\"")
@message_option
@wait_option
@json_option
@pass_options
@reports_errors
def disable(options: Options, message: str, wait: float, as_json: bool) -> None:
    """Remove hostwall's table: protected ports are open to every source.

    Recorded as a generation, so `hostwall rollback` loads the previous ruleset again.
    The agent keeps the table away, across restarts, until the next `hostwall apply`."""
    require_privileges("disable")
    result = options.engine().disable(user=invoking_user(), message=message or "hostwall disable", wait=wait)
    if as_json:
        emit_json({"generation": result.generation, "previous": result.previous, "changed": result.changed})
        return
    if not result.changed:
        options.out.line(f"already disabled (generation {result.generation})")
        return
    back = f"; `hostwall rollback` loads generation {result.previous} again" if result.previous else ""
    options.out.line(f"disabled: generation {result.generation} removed the hostwall table{back}",
                     style="warning")


