"""The command line: the only place, with the agent, that builds real adapters."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from hostwall import __version__
from hostwall.errors import HostwallError, PermissionDenied, PolicyError, Problem, StateError
from hostwall.output import Output

# The policy models (pydantic) and everything built on them are imported by the commands
# that use them: `hostwall --help` and shell completion then start in a third of the time
# (tests/bench/bench_cli.py).
if TYPE_CHECKING:
    from hostwall.audit import Usage
    from hostwall.engine import Engine, Status
    from hostwall.journal import JournalEntry
    from hostwall.plan import Plan, ServiceChange
    from hostwall.policy import Entry, Policy
    from hostwall.state import AgentState, Pending, StateDir

DEFAULT_POLICY_DIR = Path("/etc/hostwall/policies")
# hostwall.state's defaults, repeated so that --help need not import it (a unit test
# holds them equal).
DEFAULT_STATE_DIR = Path("/var/lib/hostwall")
DEFAULT_KEEP = 50
EXIT_OK = 0
EXIT_NEEDS_ATTENTION = 10  # plan: changes pending; status: drift; check: denied
CAP_NET_ADMIN = 12

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Options:
    netns: str | None
    policy_dir: Path
    state_dir: Path
    keep_generations: int = DEFAULT_KEEP
    quiet: bool = False

    @property
    def out(self) -> Output:
        return Output(quiet=self.quiet)

    def state(self) -> StateDir:
        from hostwall.state import StateDir

        return StateDir(self.state_dir, keep=self.keep_generations)

    def policy(self, path: Path | None = None) -> Policy:
        from hostwall.policy import load_policy

        with self.out.progress() as progress:
            return load_policy(path or self.policy_dir, cache=self.state().list_cache(), progress=progress)

    def engine(self) -> Engine:
        from hostwall.engine import Engine
        from hostwall.nft import NftBackend

        return Engine(NftBackend(self.netns), self.state(), spawn_reverter=self.spawn_reverter)

    def spawn_reverter(self, pending: Pending) -> None:
        """A detached process that enforces the confirm deadline even if this one, its
        terminal or the SSH session dies right after apply returns."""
        command = [sys.executable, "-m", "hostwall", "--state-dir", str(self.state_dir)]
        if self.netns:
            command += ["--netns", self.netns]
        command += ["revert-unconfirmed", str(pending.generation)]
        subprocess.Popen(
            command, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )


def _has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def require_privileges(command: str) -> None:
    if not _has_net_admin():
        raise PermissionDenied(
            f"hostwall {command} changes or reads the kernel firewall and needs root "
            f"(CAP_NET_ADMIN): run `sudo hostwall {command} ...`"
        )


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _fail(error: HostwallError, as_json: bool) -> NoReturn:
    if as_json:
        payload: dict[str, Any] = {"error": str(error), "kind": type(error).__name__,
                                   "exit_code": error.exit_code}
        if isinstance(error, PolicyError):
            payload["problems"] = [str(p) for p in error.problems]
        _emit_json(payload)
    if isinstance(error, PolicyError) and len(error.problems) > 1:
        for problem in error.problems:
            click.echo(f"hostwall: {problem}", err=True)
        click.echo(f"hostwall: policy invalid ({len(error.problems)} problems); nothing was applied", err=True)
    else:
        click.echo(f"hostwall: {error}", err=True)
    sys.exit(error.exit_code)


def reports_errors(function: F) -> F:
    """Translate the project's errors into one line and a documented exit code."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except HostwallError as error:
            _fail(error, bool(kwargs.get("as_json")))

    return wrapper  # type: ignore[return-value]


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
wait_option = click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
                           help="Seconds to wait for another hostwall command holding the lock.")
confirm_option = click.option(
    "--confirm-within", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
    help="Revert to the last confirmed generation unless `hostwall confirm` runs within SECONDS.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hostwall")
@click.option("--netns", envvar="HOSTWALL_NETNS", metavar="NAME",
              help="Make every kernel and netlink call inside network namespace NAME (/run/netns/NAME).")
# readable=False: hostwall reports unreadable paths itself, after the privilege check,
# so that a user without root learns what is needed rather than a permission detail.
@click.option("--policy-dir", envvar="HOSTWALL_POLICY_DIR", type=click.Path(path_type=Path, readable=False),
              default=DEFAULT_POLICY_DIR, show_default=True,
              help="Policy directory (*.yaml, merged) or a single policy file.")
@click.option("--state-dir", envvar="HOSTWALL_STATE_DIR", type=click.Path(path_type=Path, readable=False),
              default=DEFAULT_STATE_DIR, show_default=True, help="Where generations are kept.")
@click.option("--keep-generations", envvar="HOSTWALL_KEEP_GENERATIONS", type=click.IntRange(min=1),
              default=DEFAULT_KEEP, show_default=True, help="How many generations the state directory keeps.")
@click.option("-q", "--quiet", is_flag=True, help="No output on success: the exit code says it. Errors still go "
              "to stderr; --json output is still printed.")
@click.pass_context
def main(ctx: click.Context, netns: str | None, policy_dir: Path, state_dir: Path, keep_generations: int,
         quiet: bool) -> None:
    """hostwall: protected service ports answer only to allowlisted sources.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 invalid policy,
    4 kernel error, 5 not permitted, 6 state directory error, 7 lock busy,
    10 needs attention (plan: changes pending; status: drift; check: denied;
    audit: findings at or above --fail-on).

    \b
    Shell completion: eval "$(_HOSTWALL_COMPLETE=bash_source hostwall)" in ~/.bashrc,
    or eval "$(_HOSTWALL_COMPLETE=zsh_source hostwall)" in ~/.zshrc.

    \b
    Example: hostwall --policy-dir policies/ audit --within 30d
    """
    ctx.obj = Options(netns, policy_dir, state_dir, keep_generations, quiet)


pass_options = click.make_pass_decorator(Options)


@main.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@json_option
@pass_options
@reports_errors
def validate(options: Options, path: Path | None, as_json: bool) -> None:
    """Parse and lint the policy; needs no root.

    \b
    Example: hostwall validate /etc/hostwall/policies
    """
    from hostwall.compile import compile_policy

    policy = options.policy(path)
    ruleset = compile_policy(policy)
    entries = sum(len(s.entries) for s in policy.services)
    if as_json:
        _emit_json({
            "valid": True,
            "files": [str(f) for f in policy.files],
            "services": {s.name: {"ports": [str(p) for p in s.ports], "protocols": list(s.protocols),
                                  "action": s.action, "entries": len(s.entries)}
                         for s in policy.services},
            "entries": entries,
            "kernel_elements": ruleset.entry_count(),
            "digest": ruleset.digest,
            "warnings": policy.warnings(),
        })
        return
    for warning in policy.warnings():
        options.out.warn(warning)
    options.out.line(
        f"valid: {len(policy.files)} file(s), {len(policy.services)} services, {entries} entries "
        f"({ruleset.entry_count()} kernel elements after merging)"
    )


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


@main.command()
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
        _emit_json(_plan_json(result))
    else:
        for warning in policy.warnings():
            options.out.warn(warning)
        _print_plan(options.out, result)
    sys.exit(EXIT_NEEDS_ATTENTION if result.changed else EXIT_OK)


def _invoking_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


@main.command()
@click.option("--check", "dry_run", is_flag=True, help="Dry run: show the plan, change nothing.")
@click.option("-m", "--message", default="", help="Why this change is made (kept with the generation).")
@wait_option
@confirm_option
@json_option
@pass_options
@reports_errors
def apply(options: Options, dry_run: bool, message: str, wait: float, confirm_within: float | None,
          as_json: bool) -> None:
    """Validate, compile and load the policy in one atomic transaction.

    \b
    Example: sudo hostwall apply -m "partner-b migrated (OPS-1234)"
    """
    require_privileges("apply")
    policy = options.policy()
    result = options.engine().apply(policy, user=_invoking_user(), message=message,
                                    dry_run=dry_run, wait=wait, confirm_within=confirm_within)
    if result.applied:
        from hostwall.state import clear_reverted

        clear_reverted(options.state())  # an explicit apply overrides a past rollback
    if as_json:
        payload = _plan_json(result.plan)
        payload.update({"applied": result.applied, "generation": result.generation, "method": result.method,
                        "dry_run": dry_run, "warnings": policy.warnings(),
                        "pending": _pending_json(result.pending)})
        _emit_json(payload)
        return
    for warning in policy.warnings():
        options.out.warn(warning)
    _print_plan(options.out, result.plan)
    if result.applied:
        repaired = " (repaired drift)" if result.plan.drift and result.plan.table_present else ""
        how = "element delta" if result.method == "delta" else "full load"
        options.out.line(f"applied generation {result.generation} ({how}){repaired}")
    if result.pending:
        options.out.line(_pending_text(result.pending))
    elif dry_run and result.plan.changed:
        options.out.line("dry run: nothing was applied")


def _pending_json(pending: Pending | None) -> dict[str, Any] | None:
    if pending is None:
        return None
    return {"generation": pending.generation, "revert_to": pending.revert_to,
            "deadline": datetime.fromtimestamp(pending.deadline, UTC).isoformat(),
            "seconds_left": max(0.0, round(pending.deadline - time.time(), 1))}


def _pending_text(pending: Pending) -> str:
    deadline = datetime.fromtimestamp(pending.deadline, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    target = f"generation {pending.revert_to}" if pending.revert_to else "no hostwall table"
    left = max(0, round(pending.deadline - time.time()))
    return (f"pending confirmation: generation {pending.generation} reverts to {target} "
            f"at {deadline} (in {left} s) unless `hostwall confirm` runs")


def _status_json(status: Status, agent: AgentView, drops: DropsView) -> dict[str, Any]:
    return {
        "pending": _pending_json(status.pending),
        "loaded": status.loaded,
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
            {"time": datetime.fromtimestamp(e.timestamp, UTC).isoformat(), "message": e.message, **e.fields}
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


@dataclass(frozen=True)
class DropsView:
    entries: tuple[JournalEntry, ...]
    error: str | None = None


def _last_drops(netns: str | None, count: int = 5, since_seconds: float = 86400) -> DropsView:
    from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY
    from hostwall.journal import read_last

    matches = {"HOSTWALL_NETNS": netns} if netns else {}
    try:
        entries = read_last(message_ids=(MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY), matches=matches, count=count,
                            since=time.time() - since_seconds)
    except HostwallError as error:
        return DropsView((), str(error))
    return DropsView(tuple(entries))


@main.command()
@click.option("--drops", "drop_count", type=click.IntRange(min=0), default=5, show_default=True,
              help="How many of the last day's drop records to show (0: do not read the journal).")
@json_option
@pass_options
@reports_errors
def status(options: Options, drop_count: int, as_json: bool) -> None:
    """One screen: generation, confirm deadline, per-service entries and counters, drift,
    agent, last drops; exit 10 on drift or no table.

    \b
    Example: sudo hostwall status --json
    """
    require_privileges("status")
    result = options.engine().status()
    agent = agent_view(options.state().agent(), time.time(), _pid_alive)
    drops = _last_drops(options.netns, drop_count) if drop_count else DropsView(())
    if as_json:
        _emit_json(_status_json(result, agent, drops))
        sys.exit(EXIT_NEEDS_ATTENTION if result.drift or not result.loaded else EXIT_OK)
    out = options.out
    if not result.loaded:
        out.line("not loaded: the kernel has no hostwall table", style="error")
    else:
        out.line(f"generation {result.generation} loaded (recorded: {result.recorded_generation or 'none'})")
    if result.pending:
        out.line(_pending_text(result.pending), style="warning")
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
    sys.exit(EXIT_NEEDS_ATTENTION if result.drift or not result.loaded else EXIT_OK)


@main.command()
@click.argument("address")
@click.argument("port")
@click.option("--kernel/--no-kernel", "use_kernel", default=None,
              help="Also ask the kernel's sets (default: when running as root).")
@click.option("--why", is_flag=True, help="The reasoning: the service, the entries (file:line), the merged kernel "
              "element, and for a denial the nearest entries that might have been meant.")
@json_option
@pass_options
@reports_errors
def check(options: Options, address: str, port: str, use_kernel: bool | None, why: bool, as_json: bool) -> None:
    """Would ADDRESS reach PORT[/PROTO]? Exit 0 allowed, 10 denied.

    \b
    Example: hostwall check 203.0.113.45 443/tcp --why
    """
    from hostwall.check import AddressError, check_kernel, check_policy, explain
    from hostwall.compile import compile_policy

    policy = options.policy()
    try:
        decision = check_policy(policy, address, port)
        explanation = explain(policy, compile_policy(policy), address, port) if why else None
    except AddressError as exc:
        raise click.BadParameter(str(exc)) from None
    if use_kernel is None:
        use_kernel = _has_net_admin()
    kernel_allowed: bool | None = None
    if use_kernel and decision.service is not None:
        require_privileges("check --kernel")
        table = options.engine().kernel_table()
        kernel_allowed = check_kernel(table, decision.service, address) if table else None
    allowed = decision.allowed if kernel_allowed is None else kernel_allowed
    if as_json:
        payload: dict[str, Any] = {
            "allowed": allowed, "policy_allowed": decision.allowed, "kernel_allowed": kernel_allowed,
            "service": decision.service, "reason": decision.reason,
            "entries": [_entry_json(e) for e in decision.entries],
        }
        if explanation is not None:
            payload["why"] = {
                "steps": list(explanation.steps),
                "merged": str(explanation.merged) if explanation.merged else None,
                "merged_entries": explanation.merged_entries,
                "nearest": [{**_entry_json(n.entry), "service": n.service, "why": n.why}
                            for n in explanation.neighbours],
            }
        _emit_json(payload)
        sys.exit(EXIT_OK if allowed else EXIT_NEEDS_ATTENTION)
    out = options.out
    verdict = "allowed" if decision.allowed else "denied"
    out.line(f"{verdict}: {decision.reason}", style=verdict)
    for entry in decision.entries:
        out.line(f"  {entry.network} owner={entry.owner} reason={entry.reason!r} "
                 f"review_by={entry.review_by} ({entry.origin})")
    if explanation is not None:
        out.line("why:")
        for number, step in enumerate(explanation.steps, start=1):
            out.line(f"  {number}. {step}")
        if explanation.neighbours:
            out.table(["service", "entry", "owner", "where", "why shown"],
                      [[n.service, str(n.entry.network), n.entry.owner, str(n.entry.origin), n.why]
                       for n in explanation.neighbours], title="nearest entries (might have been meant):")
        elif not decision.allowed and decision.service is not None:
            out.line("no entry of this service lies in the same /16 (IPv6: /48), and no other service allows it")
    if kernel_allowed is not None:
        agreement = "agrees" if kernel_allowed == decision.allowed else "DISAGREES (drift?)"
        out.line(f"kernel: {'allowed' if kernel_allowed else 'denied'} ({agreement})",
                 style=None if kernel_allowed == decision.allowed else "error")
    sys.exit(EXIT_OK if allowed else EXIT_NEEDS_ATTENTION)


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {"cidr": str(entry.network), "file": entry.origin.file, "line": entry.origin.line,
            "owner": entry.owner, "reason": entry.reason, "review_by": str(entry.review_by)}


def parse_within(text: str) -> timedelta:
    """'30d', '2w', '12h'."""
    match = re.fullmatch(r"([0-9]{1,5})([hdw])", text)
    if not match:
        raise click.BadParameter(f"{text!r}: use e.g. 30d, 2w or 12h")
    hours = {"h": 1, "d": 24, "w": 24 * 7}[match[2]]
    return timedelta(hours=int(match[1]) * hours)


def _read_owners(path: Path) -> frozenset[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read the owners list {path}: {exc}", param_hint="--owners") from exc
    return frozenset(line.split("#", 1)[0].strip() for line in text.splitlines()) - {""}


@main.command()
@click.option("--within", default="30d", show_default=True, metavar="DURATION",
              help="Also report review dates this close: 30d, 2w, 12h.")
@click.option("--owners", "owners_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Known owners, one a line ('#' comments); default: settings.owners of the policy, if any.")
@click.option("--unused-days", type=click.IntRange(min=1), default=90, show_default=True,
              help="Report entries no packet matched for this many days (needs per-entry counters).")
@click.option("--usage/--no-usage", "use_usage", default=None,
              help="Read per-entry counters from the kernel (default: when running as root).")
@click.option("--fail-on", type=click.Choice(["error", "warning", "info", "never"]), default="error",
              show_default=True, help="Exit 10 when a finding is at least this severe.")
@json_option
@pass_options
@reports_errors
def audit(options: Options, within: str, owners_file: Path | None, unused_days: int, use_usage: bool | None,
          fail_on: str, as_json: bool) -> None:
    """Review dates, expired and too broad entries, overlaps, unknown owners and unused
    entries, each with a severity and what to do; exit 10 on findings at --fail-on or worse.

    \b
    Example: hostwall audit --within 30d --fail-on warning
    """
    from hostwall.audit import SEVERITIES, AuditOptions, at_least
    from hostwall.audit import audit as run_audit

    window = parse_within(within)
    policy = options.policy()
    owners = _read_owners(owners_file) if owners_file else None
    usage, usage_note = _usage(options, use_usage)
    findings = run_audit(policy, AuditOptions(now_utc(), window, owners, unused_days, usage))
    counts = {severity: sum(1 for f in findings if f.severity == severity) for severity in SEVERITIES}
    failed = fail_on != "never" and any(at_least(f.severity, fail_on) for f in findings)
    if as_json:
        _emit_json({"findings": [f.to_data() for f in findings], "counts": counts, "fail_on": fail_on,
                    "failed": failed,
                    "owners_checked": owners is not None or policy.settings.owners is not None,
                    "unused_checked": usage is not None, "unused_note": usage_note})
        sys.exit(EXIT_NEEDS_ATTENTION if failed else EXIT_OK)
    out = options.out
    if out.terminal:
        out.table(["severity", "rule", "service", "entry", "owner", "where", "finding", "do"],
                  [[f.severity, f.rule, f.service or "", f.subject, f.owner, f.where, f.message, f.action]
                   for f in findings], styles=[f.severity for f in findings])
    else:
        for f in findings:
            out.line(f"{f.severity}  {f.rule}  {f.where}  {f.service or '-'}  {f.subject}  owner={f.owner}: "
                     f"{f.message}; do: {f.action}")
    if usage_note:
        out.line(f"unused entries not checked: {usage_note}", style="muted")
    summary = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES))
    out.line(f"audit: {len(findings)} finding(s): {summary}" + (f"; failing on {fail_on}" if failed else ""),
             style="error" if failed else "ok")
    sys.exit(EXIT_NEEDS_ATTENTION if failed else EXIT_OK)


def _usage(options: Options, use_usage: bool | None) -> tuple[Usage | None, str | None]:
    """The kernel's per-entry counters, or None and why there are none."""
    if use_usage is None:
        use_usage = _has_net_admin()
    if not use_usage:
        return None, "reading the kernel's counters needs root (or --usage)"
    require_privileges("audit --usage")
    from hostwall.usage import kernel_usage

    return kernel_usage(options.engine(), options.state())


@main.command()
@click.argument("owner", required=False)
@json_option
@pass_options
@reports_errors
def owners(options: Options, owner: str | None, as_json: bool) -> None:
    """What each owner holds (every entry with OWNER): for offboarding and reviews.

    \b
    Example: hostwall owners partner-b
    """
    from hostwall.audit import holdings

    policy = options.policy()
    held = holdings(policy)
    if owner is not None:
        held = {owner: held.get(owner, [])}
    if as_json:
        _emit_json({name: {"entries": sum(h.entries for h in items), "services": sorted({h.service for h in items}),
                           "items": [h.to_data() for h in items]} for name, items in held.items()})
        return
    out = options.out
    if owner is None:
        out.table(["owner", "entries", "services", "next review"],
                  [[name, str(sum(h.entries for h in items)), ",".join(sorted({h.service for h in items})),
                    str(min(h.review_by for h in items))] for name, items in held.items()], right=(1,))
        return
    items = held[owner]
    if not items:
        out.line(f"no entry is owned by {owner!r}")
        return
    out.table(["service", "entry", "entries", "review by", "where", "reason"],
              [[h.service, h.subject, str(h.entries), str(h.review_by), h.where, h.reason] for h in items],
              right=(2,))


@main.command()
@click.option("--owner", required=True, help="Remove every allow entry with this owner.")
@click.option("--write", is_flag=True, help="Apply the edits to the policy files (default: only print them).")
@json_option
@pass_options
@reports_errors
def revoke(options: Options, owner: str, write: bool, as_json: bool) -> None:
    """The exact policy edits that remove an owner's entries; --write applies them,
    keeping every other line (comments, order) as it is, and validates the result.
    The kernel changes only at the next apply.

    \b
    Example: hostwall revoke --owner partner-b --write && sudo hostwall apply -m "partner-b offboarded"
    """
    from hostwall.revoke import remove_owner
    from hostwall.state import atomic_write

    before = options.policy()
    edits = []
    for file in before.files:
        edit = remove_owner(file.read_text(encoding="utf-8-sig"), str(file), owner)
        if edit.removals:
            edits.append(edit)
    owners_list = before.settings.owners is not None and owner in before.settings.owners
    written = False
    unreferenced: list[str] = []
    if write and edits:
        originals = {edit.path: Path(edit.path).read_bytes() for edit in edits}
        try:
            for edit in edits:
                atomic_write(Path(edit.path), edit.new.encode())
            after = options.policy()
        except (OSError, PolicyError) as exc:
            for path, data in originals.items():
                atomic_write(Path(path), data)
            if isinstance(exc, PolicyError):
                raise PolicyError([Problem(p.file, p.line, p.entry, f"{p.message} (after revoking {owner}; "
                                           "the files were put back)") for p in exc.problems]) from exc
            raise StateError(f"cannot write the policy: {exc}; the files were put back") from exc
        written = True
        unreferenced = sorted(_list_paths(before) - _list_paths(after))
    if as_json:
        _emit_json({"owner": owner, "written": written, "unreferenced_lists": unreferenced,
                    "still_in_owners_list": owners_list,
                    "edits": [{"file": e.path, "diff": e.diff(),
                               "removals": [{"service": r.service, "entry": r.entry, "subject": r.subject,
                                             "line": r.line, "first_line": r.first_line,
                                             "last_line": r.last_line} for r in e.removals]} for e in edits]})
        return
    out = options.out
    if not edits:
        out.line(f"no entry is owned by {owner!r}: nothing to revoke")
        return
    for edit in edits:
        for removal in edit.removals:
            out.line(f"{edit.path}:{removal.first_line}-{removal.last_line}: remove {removal.entry} "
                     f"({removal.subject})")
    for edit in edits:
        for line in edit.diff().splitlines():
            out.line(line, style="error" if line.startswith("-") and not line.startswith("---") else None)
    count = sum(len(e.removals) for e in edits)
    if written:
        out.line(f"revoked {owner}: {count} entr{'y' if count == 1 else 'ies'} removed from {len(edits)} file(s); "
                 "the policy is valid. Load it with `sudo hostwall apply`", style="ok")
        for path in unreferenced:
            out.line(f"{path} is no longer referenced by any entry; delete it if nothing else uses it")
    else:
        out.line(f"dry run: {count} entr{'y' if count == 1 else 'ies'} of {owner}; --write applies these edits")
    if owners_list:
        out.line(f"{owner} is still in settings.owners; remove it there if they are gone")


def _list_paths(policy: Policy) -> set[str]:
    from hostwall.policy import Entries

    return {part.path for s in policy.services if isinstance(s.entries, Entries) for part in s.entries.lists}


def now_utc() -> datetime:
    return datetime.now(UTC)


@main.command()
@reports_errors
def demo() -> None:
    """Run the built-in namespace lab: allowed and denied clients against 443 and 5432.

    Creates three network namespaces, loads a policy into the lab server's namespace
    only, probes every port from both clients, prints the results and removes the lab.

    \b
    Example: sudo hostwall demo
    """
    require_privileges("demo")
    from hostwall.demo import run_demo

    sys.exit(EXIT_OK if run_demo(click.echo) else 1)


@main.command()
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
        _emit_json([{"generation": g.meta.number, "created": datetime.fromtimestamp(g.meta.created, UTC).isoformat(),
                     "user": g.meta.user, "message": g.meta.message, "entries": g.meta.entries,
                     "digest": g.meta.digest, "current": bool(current and current.generation == g.meta.number)}
                    for g in items])
        return
    if not items:
        options.out.line(f"no generations recorded in {options.state_dir}")
        return
    loaded = [bool(current and current.generation == g.meta.number) for g in items]
    rows = [["*" if is_loaded else "", str(g.meta.number),
             datetime.fromtimestamp(g.meta.created, UTC).strftime("%Y-%m-%d %H:%M:%SZ"), g.meta.user,
             str(g.meta.entries), g.meta.digest[:12], g.meta.message]
            for g, is_loaded in zip(items, loaded, strict=True)]
    options.out.table(["", "generation", "created", "user", "entries", "sha256", "message"], rows,
                      styles=["ok" if is_loaded else None for is_loaded in loaded], right=(1, 4))


@main.command()
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
        _emit_json({"generation": result.generation, "previous": result.previous,
                    "replayed": result.replayed, "rendered_because": result.rendered_because,
                    "pending": _pending_json(result.pending)})
        return
    how = "stored transaction replayed" if result.replayed else f"rendered again: {result.rendered_because}"
    options.out.line(f"rolled back from generation {result.previous} to {result.generation} ({how})")
    if result.pending:
        options.out.line(_pending_text(result.pending))


@main.command()
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
        _emit_json({"confirmed": confirmed.generation if confirmed else None})
    elif confirmed:
        options.out.line(f"generation {confirmed.generation} confirmed")
    else:
        options.out.line("nothing to confirm")


@main.command()
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
    from hostwall.plan import diff_rulesets

    state = options.state()
    changes = diff_rulesets(state.generation(old).ruleset(), state.generation(new).ruleset())
    if as_json:
        _emit_json({"old": old, "new": new, "services": [
            {"name": c.name, "status": c.status, "details": list(c.details),
             "added": [str(i) for i in c.added], "removed": [str(i) for i in c.removed]} for c in changes]})
        return
    if not changes:
        options.out.line(f"generations {old} and {new} load the same ruleset")
    _print_changes(options.out, changes, limit=50)


@main.command("revert-unconfirmed", hidden=True)
@click.argument("generation", type=int)
@pass_options
@reports_errors
def revert_unconfirmed(options: Options, generation: int) -> None:
    """The detached reverter behind --confirm-within: waits for the deadline, then reverts."""
    state = options.state()
    while (pending := state.pending()) is not None and pending.generation == generation:
        remaining = pending.deadline - time.time()
        if remaining <= 0:
            from hostwall.state import note_reverted

            if options.engine().revert_if_unconfirmed(generation):
                note_reverted(state, generation)
            return
        time.sleep(min(remaining, 1.0))


def _log_group(options: Options) -> int:
    """The group the loaded ruleset logs to: the recorded generation's, else the policy's."""
    state = options.state()
    current = state.current()
    if current is not None:
        try:
            return state.generation(current.generation).ruleset().log_group
        except HostwallError:
            pass
    try:
        return options.policy().settings.log_group
    except HostwallError:
        from hostwall.policy import Settings

        return Settings().log_group


def _boot_time() -> float:
    # From the clocks, not /proc/stat: the unit's ProcSubset=pid hides /proc/stat.
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


@main.command()
@click.option("--log-group", type=click.IntRange(0, 65535), default=None,
              help="NFLOG group to read (default: the loaded ruleset's).")
@click.option("--flood-window", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds per flood-control window.")
@click.option("--flood-records", type=click.IntRange(min=1), default=5, show_default=True,
              help="Records per source and window before it is summarised.")
@click.option("--recon-per-minute", type=click.IntRange(min=1), default=60, show_default=True,
              help="Drops per minute from one source that raise a reconnaissance warning.")
@click.option("--nflog-buffer", type=click.IntRange(min=1024), default=16 << 20, show_default=True,
              help="Receive buffer for drop logs, in bytes.")
@click.option("--nflog-queue-threshold", type=click.IntRange(min=1), default=64, show_default=True,
              help="Drop logs the kernel batches into one message.")
@click.option("--full-check-interval", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds between full comparisons of the kernel's sets with the record.")
@click.option("--metrics-file", type=click.Path(path_type=Path), default=None,
              help="Write Prometheus metrics here (node_exporter textfile collector).")
@click.option("--metrics-interval", type=click.FloatRange(min=1), default=15.0, show_default=True)
@click.option("--test-stall-watchdog-after", type=float, default=None, hidden=True)
@pass_options
@reports_errors
def agent(options: Options, log_group: int | None, flood_window: float, flood_records: int,
          recon_per_minute: int, nflog_buffer: int, nflog_queue_threshold: int, full_check_interval: float,
          metrics_file: Path | None, metrics_interval: float, test_stall_watchdog_after: float | None) -> None:
    """Run the agent in the foreground (systemd Type=notify service).

    On start it loads the policy (or keeps the last generation when the policy is
    invalid; with neither, it closes the protected ports to all but loopback), then
    reports READY. SIGHUP reloads the policy. It rolls back unconfirmed changes at
    their deadline, and any left unconfirmed from before a reboot. It restores its
    table when something changes it, and streams drop logs into journald. SIGTERM
    stops it and leaves the firewall in place.

    \b
    Example: sudo hostwall agent --metrics-file /var/lib/node_exporter/hostwall.prom
    """
    require_privileges("agent")
    import signal

    from hostwall.agent import Agent, AgentSettings, DropStreamer, InterfaceNames
    from hostwall.drops import MESSAGE_ID_AGENT, PRIORITY_INFO, DropReporter, FloodControl, Record
    from hostwall.engine import Engine
    from hostwall.journal import JournalSink
    from hostwall.nfevents import RulesetEvents
    from hostwall.nflog import NflogReader, NflogSettings
    from hostwall.nft import NftBackend
    from hostwall.notify import Notifier

    state = options.state()
    backend = NftBackend(options.netns)
    # The agent enforces confirmation deadlines itself; no detached reverter is needed.
    engine = Engine(backend, state)
    sink = JournalSink({"HOSTWALL_NETNS": options.netns} if options.netns else None)
    group = log_group if log_group is not None else _log_group(options)
    reader = NflogReader(NflogSettings(group=group, receive_buffer=nflog_buffer,
                                       queue_threshold=nflog_queue_threshold), options.netns)

    def generation() -> int | None:
        try:
            current = state.current()
        except HostwallError:
            return None
        return current.generation if current else None

    streamer = DropStreamer(reader, sink, DropReporter(
        FloodControl(flood_window, flood_records, recon_per_minute), time.monotonic),
        InterfaceNames(options.netns), generation)
    service = Agent(
        engine, state, options.policy, Notifier(), sink, streamer=streamer,
        events=RulesetEvents(options.netns), counters=backend.counters,
        settings=AgentSettings(full_check_interval, metrics_file, metrics_interval, test_stall_watchdog_after),
        boot_time=_boot_time(),
    )
    requests = {"reload": False, "stop": False}

    def on_signal(signum: int, _frame: object) -> None:
        requests["reload" if signum == signal.SIGHUP else "stop"] = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    sink.send(Record(f"agent starting: drop logs from NFLOG group {group}", MESSAGE_ID_AGENT, PRIORITY_INFO,
                     {"HOSTWALL_LOG_GROUP": str(group)}))
    service.start()
    try:
        while not requests["stop"]:
            if requests["reload"]:
                requests["reload"] = False
                service.reload()
            service.tick()
    finally:
        service.stop()
        reader.close()
        stats = streamer.stats
        sink.send(Record(f"agent stopped: {stats.packets} drops read, {stats.records} records, "
                         f"{stats.lost} lost; the firewall stays in place",
                         MESSAGE_ID_AGENT, PRIORITY_INFO,
                         {"HOSTWALL_LOST_TOTAL": str(stats.lost), "HOSTWALL_DROPS_READ": str(stats.packets)}))


def parse_since(text: str, now: float | None = None) -> float:
    """'10m', '2h', '1d', '30s' ago, or an ISO 8601 timestamp."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    relative = re.fullmatch(r"([0-9]{1,9})([smhd])", text)
    if relative:
        return now - int(relative[1]) * units[relative[2]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use e.g. 10m, 2h, 1d or 2026-11-28T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@main.command()
@click.option("--service", help="Only this service.")
@click.option("--source", "source_address", metavar="ADDRESS", help="Only this source address.")
@click.option("--since", "since_text", metavar="WHEN", help="e.g. 10m, 2h, 1d or an ISO timestamp.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new drops as they come.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show the N sources with most drops.")
@json_option
@pass_options
@reports_errors
def drops(options: Options, service: str | None, source_address: str | None, since_text: str | None,
          follow: bool, top: int | None, as_json: bool) -> None:
    """Drop records from the journal, filtered; --top N ranks sources.

    \b
    Example: hostwall drops --since 1h --service postgres --top 10
    """
    from collections import Counter

    from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY
    from hostwall.journal import read_entries

    matches = {}
    if service:
        matches["HOSTWALL_SERVICE"] = service
    if source_address:
        matches["HOSTWALL_SRC"] = source_address
    if options.netns:
        matches["HOSTWALL_NETNS"] = options.netns
    entries = read_entries(
        message_ids=(MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY), matches=matches,
        since=parse_since(since_text) if since_text else None, follow=follow and top is None,
    )
    if top is not None:
        totals: Counter[tuple[str, str]] = Counter()
        for entry in entries:
            totals[(entry.fields.get("HOSTWALL_SRC", "?"), entry.fields.get("HOSTWALL_SERVICE", "?"))] += int(
                entry.fields.get("HOSTWALL_COUNT", "1"))
        ranked = totals.most_common(top)
        if as_json:
            _emit_json([{"source": s, "service": svc, "drops": n} for (s, svc), n in ranked])
        else:
            options.out.table(["drops", "source", "service"],
                              [[str(count), address, name] for (address, name), count in ranked], right=(0,))
        return
    for entry in entries:
        if as_json:
            click.echo(json.dumps({"time": datetime.fromtimestamp(entry.timestamp, UTC).isoformat(),
                                   "message": entry.message, **entry.fields}, sort_keys=True))
        else:
            stamp = datetime.fromtimestamp(entry.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
            options.out.line(f"{stamp}  {entry.message}")
