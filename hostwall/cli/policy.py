"""Commands that read the policy only: validate, check, audit, owners, revoke."""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from hostwall import clock
from hostwall.cli.common import (
    EXIT_NEEDS_ATTENTION,
    EXIT_OK,
    Options,
    emit_json,
    has_net_admin,
    json_option,
    pass_options,
    reports_errors,
    require_privileges,
)
from hostwall.errors import PolicyError, Problem, StateError

if TYPE_CHECKING:
    from hostwall.audit import Usage
    from hostwall.policy import Entry, Policy


@click.command(epilog="Example: hostwall validate /etc/hostwall/policies")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@json_option
@pass_options
@reports_errors
def validate(options: Options, path: Path | None, as_json: bool) -> None:
    """Parse and lint the policy; needs no root."""
    from hostwall.compile import compile_policy

    policy = options.policy(path)
    ruleset = compile_policy(policy)
    entries = sum(len(s.entries) for s in policy.services)
    if as_json:
        emit_json({
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


@click.command(epilog="Example: hostwall check 203.0.113.45 443/tcp --why")
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

    ADDRESS may be a CIDR: allowed when every address in it is, with the entries
    that cover it."""
    from hostwall.check import AddressError, check_kernel, check_policy, explain
    from hostwall.compile import compile_policy

    policy = options.policy()
    try:
        decision = check_policy(policy, address, port)
        explanation = explain(policy, compile_policy(policy), address, port) if why else None
    except AddressError as exc:
        raise click.BadParameter(str(exc)) from None
    if use_kernel is None:
        use_kernel = has_net_admin()
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
            "entries": [entry_json(e) for e in decision.entries],
        }
        if explanation is not None:
            payload["why"] = {
                "steps": list(explanation.steps),
                "merged": str(explanation.merged) if explanation.merged else None,
                "merged_entries": explanation.merged_entries,
                "nearest": [{**entry_json(n.entry), "service": n.service, "why": n.why}
                            for n in explanation.neighbours],
            }
        emit_json(payload)
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


def entry_json(entry: Entry) -> dict[str, Any]:
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


@click.command(epilog="Example: hostwall audit --within 30d --fail-on warning")
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
    """
    from hostwall.audit import SEVERITIES, AuditOptions, at_least
    from hostwall.audit import audit as run_audit

    window = parse_within(within)
    policy = options.policy()
    owners = _read_owners(owners_file) if owners_file else None
    usage, usage_note = _usage(options, use_usage)
    findings = run_audit(policy, AuditOptions(clock.now_utc(), window, owners, unused_days, usage))
    counts = {severity: sum(1 for f in findings if f.severity == severity) for severity in SEVERITIES}
    failed = fail_on != "never" and any(at_least(f.severity, fail_on) for f in findings)
    if as_json:
        emit_json({"findings": [f.to_data() for f in findings], "counts": counts, "fail_on": fail_on,
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
        use_usage = has_net_admin()
    if not use_usage:
        return None, "reading the kernel's counters needs root (or --usage)"
    require_privileges("audit --usage")
    from hostwall.usage import kernel_usage

    return kernel_usage(options.engine(), options.state())


@click.command(epilog="Example: hostwall owners partner-b")
@click.argument("owner", required=False)
@json_option
@pass_options
@reports_errors
def owners(options: Options, owner: str | None, as_json: bool) -> None:
    """What each owner holds (every entry with OWNER): for offboarding and reviews."""
    from hostwall.audit import holdings

    policy = options.policy()
    held = holdings(policy)
    if owner is not None:
        held = {owner: held.get(owner, [])}
    if as_json:
        emit_json({name: {"entries": sum(h.entries for h in items), "services": sorted({h.service for h in items}),
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
              [[h.service, f"{h.subject} (expired)" if h.expired else h.subject, str(h.entries), str(h.review_by),
                h.where, h.reason] for h in items],
              right=(2,), styles=["muted" if h.expired else None for h in items])


@click.command(epilog="Example: hostwall revoke --owner partner-b --write && "
                      "sudo hostwall apply -m \"partner-b offboarded\"")
@click.option("--owner", required=True, help="Remove every allow entry with this owner.")
@click.option("--write", is_flag=True, help="Apply the edits to the policy files (default: only print them).")
@json_option
@pass_options
@reports_errors
def revoke(options: Options, owner: str, write: bool, as_json: bool) -> None:
    """The exact policy edits that remove an owner's entries; --write applies them,
    keeping every other line (comments, order) as it is, and validates the result.
    The kernel changes only at the next apply.
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
        emit_json({"owner": owner, "written": written, "unreferenced_lists": unreferenced,
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

