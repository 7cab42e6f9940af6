"""Commands that load the kernel or read the generations: plan, apply, rollback,
confirm, status, generations, diff, and the detached reverter."""

from __future__ import annotations

import getpass
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from hostwall import clock
from hostwall.cli.common import (
    EXIT_NEEDS_ATTENTION,
    EXIT_OK,
    Options,
    confirm_option,
    emit_json,
    json_option,
    pass_options,
    reports_errors,
    require_privileges,
    wait_option,
)
from hostwall.cli.journal import DropsView, last_drops
from hostwall.output import Output

if TYPE_CHECKING:
    from hostwall.engine import Status
    from hostwall.plan import Plan, ServiceChange
    from hostwall.state import AgentState, Pending


def _interval_json(interval: Any) -> str:
    return str(interval)


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "changed": plan.changed,
        "table_present": plan.table_present,
        "drift": list(plan.drift.reasons),
        "summary": plan.summary,
        "services": [
            {"name": s.name, "status": s.status, "details": list(s.details),
             "added": [_interval_json(i) for i in s.added],
             "removed": [_interval_json(i) for i in s.removed]}
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



@click.command()
@json_option
@pass_options
@reports_errors
def plan(options: Options, as_json: bool) -> None:
    """Show what apply would change; exit 10 when there are changes.

    \b
    Example: sudo hostwall plan
    """
    from hostwall.compile import compile_policy

    require_privileges("plan")
    policy = options.policy()
    result = options.engine().plan(compile_policy(policy))
    if as_json:
        emit_json(_plan_json(result))
    else:
        for warning in policy.warnings():
            options.out.warn(warning)
        _print_plan(options.out, result)
    sys.exit(EXIT_NEEDS_ATTENTION if result.changed else EXIT_OK)



def invoking_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()



@click.command()
@click.option("--check", "dry_run", is_flag=True, help="Dry run: show the plan, change nothing.")
@click.option("-m", "--message", default="", help="Why this change is made (kept with the generation).")
@wait_option
@confirm_option
@json_option
@pass_options
@reports_errors
def apply(options: Options, dry_run: bool, message: str, wait: float, confirm_within: float | None,
          as_json: bool) -> None:
    """Validate, compile and load the policy in one atomic transaction; with --check,
    exit 10 when there are changes (like plan).

    \b
    Example: sudo hostwall apply -m "partner-b migrated (OPS-1234)"
    """
    require_privileges("apply")
    policy = options.policy()
    result = options.engine().apply(policy, user=invoking_user(), message=message,
                                    dry_run=dry_run, wait=wait, confirm_within=confirm_within)
    if result.applied:
        from hostwall.state import clear_reverted

        clear_reverted(options.state())  # an explicit apply overrides a past rollback
    # Like plan: a dry run that finds changes needs attention (exit 10).
    exit_code = EXIT_NEEDS_ATTENTION if dry_run and result.plan.changed else EXIT_OK
    if as_json:
        payload = _plan_json(result.plan)
        payload.update({"applied": result.applied, "generation": result.generation, "method": result.method,
                        "dry_run": dry_run, "warnings": policy.warnings(),
                        "pending": pending_json(result.pending)})
        emit_json(payload)
        sys.exit(exit_code)
    for warning in policy.warnings():
        options.out.warn(warning)
    _print_plan(options.out, result.plan)
    if result.applied:
        repaired = " (repaired drift)" if result.plan.drift and result.plan.table_present else ""
        how = "element delta" if result.method == "delta" else "full load"
        options.out.line(f"applied generation {result.generation} ({how}){repaired}")
    if result.pending:
        options.out.line(pending_text(result.pending))
    elif dry_run and result.plan.changed:
        options.out.line("dry run: nothing was applied")
    sys.exit(exit_code)



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



@dataclass(frozen=True)
class AgentView:
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



@click.command()
@click.option("--drops", "drop_count", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many of the last day's drop records to show (0: do not read the journal).")
@json_option
@pass_options
@reports_errors
def status(options: Options, drop_count: int, as_json: bool) -> None:
    """One screen: generation, confirm deadline, per-service entries and counters, drift,
    agent, last drops; exit 10 on drift or no table (unless disabled).

    \b
    Example: sudo hostwall status --json
    """
    require_privileges("status")
    result = options.engine().status()
    agent = agent_view(options.state().agent(), clock.now(), _pid_alive)
    drops = last_drops(options.netns, drop_count) if drop_count else DropsView(())
    if as_json:
        emit_json(_status_json(result, agent, drops))
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



@click.command()
@json_option
@pass_options
@reports_errors
def generations(options: Options, as_json: bool) -> None:
    """List the recorded generations, newest last; * marks the loaded one.

    \b
    Example: sudo hostwall generations
    """
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



@click.command()
@click.option("--to", "target", type=click.IntRange(min=1), default=None,
              help="Generation to load (default: the one before the loaded one).")
@wait_option
@confirm_option
@json_option
@pass_options
@reports_errors
def rollback(options: Options, target: int | None, wait: float, confirm_within: float | None,
             as_json: bool) -> None:
    """Load an earlier generation atomically, exactly as it was submitted.

    \b
    Example: sudo hostwall rollback --to 41 --confirm-within 120
    """
    require_privileges("rollback")
    result = options.engine().rollback(target, wait=wait, confirm_within=confirm_within)
    if as_json:
        emit_json({"generation": result.generation, "previous": result.previous,
                    "replayed": result.replayed, "rendered_because": result.rendered_because,
                    "pending": pending_json(result.pending)})
        return
    how = "stored transaction replayed" if result.replayed else f"rendered again: {result.rendered_because}"
    options.out.line(f"rolled back from generation {result.previous} to {result.generation} ({how})")
    if result.pending:
        options.out.line(pending_text(result.pending))



@click.command()
@wait_option
@json_option
@pass_options
@reports_errors
def confirm(options: Options, wait: float, as_json: bool) -> None:
    """Keep the change applied with --confirm-within (stops the automatic revert).

    \b
    Example: sudo hostwall confirm
    """
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



@click.command()
@click.argument("old", type=click.IntRange(min=1))
@click.argument("new", type=click.IntRange(min=1))
@json_option
@pass_options
@reports_errors
def diff(options: Options, old: int, new: int, as_json: bool) -> None:
    """What changed between two generations.

    \b
    Example: sudo hostwall diff 41 42
    """
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



@click.command("revert-unconfirmed", hidden=True)
@click.argument("generation", type=int)
@pass_options
@reports_errors
def revert_unconfirmed(options: Options, generation: int) -> None:
    """The detached reverter behind --confirm-within: waits for the deadline, then reverts."""
    state = options.state()
    while (pending := state.pending()) is not None and pending.generation == generation:
        remaining = pending.deadline - clock.now()
        if remaining <= 0:
            from hostwall.state import note_reverted

            if options.engine().revert_if_unconfirmed(generation):
                note_reverted(state, generation)
            return
        time.sleep(min(remaining, 1.0))




@click.command()
@click.option("-m", "--message", default="", help="Why hostwall is disabled (kept with the generation).")
@wait_option
@json_option
@pass_options
@reports_errors
def disable(options: Options, message: str, wait: float, as_json: bool) -> None:
    """Remove hostwall's table: protected ports are open to every source.

    Recorded as a generation, so `hostwall rollback` loads the previous ruleset again.
    The agent keeps the table away, across restarts, until the next `hostwall apply`.

    \b
    Example: sudo hostwall disable -m "OPS-1300: tracing a partner's outage"
    """
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
