"""Keeping an allowlist true: review dates, expired and too broad entries, overlaps,
unknown owners and entries no packet used. Pure: the policy, the clock and the usage
evidence come in, findings go out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date, datetime, timedelta
from typing import Literal, Protocol

from msgspec import Struct
from msgspec.structs import replace

from hostwall.cidr import Interval
from hostwall.policy import Entries, Entry, ListFile, Origin, Policy, Service

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


def at_least(severity: Severity, threshold: str) -> bool:
    return SEVERITIES.index(severity) >= SEVERITIES.index(threshold)


class Finding(Struct, frozen=True):
    rule: str
    severity: Severity
    service: str | None
    subject: str  # the CIDR, or "file: NAME (N entries)" for a list
    owner: str
    where: str  # file:line
    message: str
    action: str

    def to_data(self) -> dict[str, str | None]:
        return {"rule": self.rule, "severity": self.severity, "service": self.service, "subject": self.subject,
                "owner": self.owner, "where": self.where, "message": self.message, "action": self.action}


class Usage(Protocol):
    """Evidence of which kernel elements carried packets."""

    def packets(self, service: str, interval: Interval) -> tuple[int, float] | None:
        """(packets counted by the kernel element holding interval, since when), or None
        when there is no evidence for it."""


class AuditOptions(Struct, frozen=True):
    now: datetime
    within: timedelta = timedelta(days=30)
    owners: frozenset[str] | None = None  # None: settings.owners of the policy, if any
    unused_days: int = 90
    usage: Usage | None = None


# Rules, their severity and what they mean; README documents the same table.
RULES: dict[str, tuple[Severity, str]] = {
    "review-overdue": ("error", "review_by is in the past"),
    "review-due": ("warning", "review_by falls within --within"),
    "expired": ("warning", "expires is past: the entry is no longer loaded but is still in the file"),
    "too-broad": ("warning", "wider than the service's widest prefix (default IPv4 /24, IPv6 /48), no broad_ok"),
    "duplicate": ("warning", "the same range as another entry of the service"),
    "contained": ("warning", "inside another entry of the same owner: it adds nothing"),
    "nested": ("info", "inside another owner's entry: redundant in the kernel, kept for its owner"),
    "unknown-owner": ("error", "owner is not in the owners list"),
    "unused": ("warning", "no packet matched it for --unused-days"),
    "unprotected-builtin": ("warning", "a built-in port (443, 5432) that no service protects"),
    "allows-nobody": ("warning", "a service named in the policy admits no source: only loopback reaches it"),
}


def _finding(rule: str, service: str | None, subject: str, owner: str, where: Origin | str, message: str,
             action: str) -> Finding:
    return Finding(rule, RULES[rule][0], service, subject, owner, str(where), message, action)


class _Unit(Struct, frozen=True):
    """What one allow entry of a file says: an inline entry, or a file: list with its lines."""

    service: str
    owner: str
    review_by: date
    subject: str
    where: str
    entry: str


def _units(service: Service) -> Iterator[_Unit]:
    parts: Iterable[Entry | ListFile] = service.entries.parts if isinstance(service.entries, Entries) \
        else service.entries
    for part in parts:
        if isinstance(part, Entry):
            yield _Unit(service.name, part.owner, part.review_by, str(part.network), str(part.origin),
                        part.origin.entry)
        else:
            where = str(part.origin) if part.origin is not None else part.path
            yield _Unit(service.name, part.owner, part.review_by, f"file: {part.path} ({len(part)} entries)",
                        where, part.label)


def audit(policy: Policy, options: AuditOptions) -> list[Finding]:
    findings: list[Finding] = []
    today = options.now.date()
    if options.owners is None and policy.settings.owners is not None:
        options = replace(options, owners=frozenset(policy.settings.owners))
    for service in policy.services:
        for unit in _units(service):
            findings.extend(_metadata_findings(unit, today, options))
        findings.extend(_breadth_findings(service))
        findings.extend(_overlap_findings(service))
        if options.usage is not None:
            findings.extend(_unused_findings(service, options.usage, options))
        if service.allows_nobody:
            findings.append(_finding("allows-nobody", service.name, "", "", service.defined_in,
                                     "no allow entry is loaded: the service answers loopback only",
                                     "add an allow entry, or remove the service if closing it is meant"))
    findings.extend(_expired_findings(policy))
    findings.extend(
        _finding("unprotected-builtin", gap.service, f"{gap.port}/{gap.protocol}", "-", gap.defined_in,
                 f"built-in port {gap.port}/{gap.protocol} is not protected by any service",
                 f"add {gap.port} to the ports of {gap.service}, unless every source may reach it")
        for gap in policy.unprotected_builtins())
    return sorted(findings, key=lambda f: (-SEVERITIES.index(f.severity), f.rule, f.service or "", *_place(f.where)))


def _place(where: str) -> tuple[str, int]:
    """file:line sorted by file, then by line as a number."""
    file, _, line = where.rpartition(":")
    return (file, int(line)) if line.isdigit() else (where, 0)


def _metadata_findings(unit: _Unit, today: date, options: AuditOptions) -> Iterator[Finding]:
    days = (unit.review_by - today).days
    if days < 0:
        yield _finding("review-overdue", unit.service, unit.subject, unit.owner, unit.where,
                       f"review_by {unit.review_by} passed {-days} day(s) ago",
                       f"ask {unit.owner} whether it is still needed; then move review_by forward or "
                       f"remove it (hostwall revoke --owner {unit.owner} lists every entry they hold)")
    elif unit.review_by <= today + options.within:
        yield _finding("review-due", unit.service, unit.subject, unit.owner, unit.where,
                       f"review_by {unit.review_by} is in {days} day(s)",
                       f"ask {unit.owner} before {unit.review_by} whether it is still needed")
    if options.owners is not None and unit.owner not in options.owners:
        yield _finding("unknown-owner", unit.service, unit.subject, unit.owner, unit.where,
                       f"owner {unit.owner!r} is not in the owners list",
                       "correct the owner, or add it to settings.owners (or the --owners file)")


def _breadth_findings(service: Service) -> Iterator[Finding]:
    for entry in service.entries:
        widest = service.widest.of(entry.interval.family)
        if entry.network.prefixlen < widest and not entry.broad_ok:
            yield _finding("too-broad", service.name, str(entry.network), entry.owner, entry.origin,
                           f"/{entry.network.prefixlen} is wider than /{widest}, the widest that "
                           f"service {service.name} expects for IPv{entry.interval.family}",
                           "narrow it to the addresses meant, or add broad_ok: true with broad_reason: why")


def _overlap_findings(service: Service) -> Iterator[Finding]:
    """One sweep per family over the entries sorted by start (widest first). Two CIDR
    prefixes either nest or are disjoint, so an entry that starts inside the entry
    reaching furthest so far lies wholly inside it."""
    for family in (4, 6):
        ordered = sorted((e for e in service.entries if e.interval.family == family),
                         key=lambda e: (e.interval.first, -e.interval.last))
        reach: Entry | None = None
        for entry in ordered:
            if reach is not None and entry.interval.first <= reach.interval.last:
                other = f"{reach.network} ({reach.origin}, owner {reach.owner})"
                if (entry.interval.first, entry.interval.last) == (reach.interval.first, reach.interval.last):
                    yield _finding("duplicate", service.name, str(entry.network), entry.owner, entry.origin,
                                   f"the same range as {other}", "remove one of the two")
                elif entry.owner == reach.owner:
                    yield _finding("contained", service.name, str(entry.network), entry.owner, entry.origin,
                                   f"inside {other}", "remove it, or narrow the wider entry if that was meant")
                else:
                    # Redundant in the kernel, but it keeps its own owner accountable
                    # should the wider entry go.
                    yield _finding("nested", service.name, str(entry.network), entry.owner, entry.origin,
                                   f"inside {other}, which another owner holds",
                                   f"check with {reach.owner} that the wider entry is meant")
            if reach is None or entry.interval.last > reach.interval.last:
                reach = entry


def _unused_findings(service: Service, usage: Usage, options: AuditOptions) -> Iterator[Finding]:
    horizon = options.now.timestamp() - options.unused_days * 86400
    for entry in service.entries:
        evidence = usage.packets(service.name, entry.interval)
        if evidence is None:
            continue
        packets, since = evidence
        # Counting that started inside the window proves nothing about the whole window.
        if packets == 0 and since <= horizon:
            yield _finding("unused", service.name, str(entry.network), entry.owner, entry.origin,
                           f"no packet matched it in the last {options.unused_days} days",
                           f"ask {entry.owner} whether it is still needed; remove it if not")


def _expired_findings(policy: Policy) -> Iterator[Finding]:
    seen: set[str] = set()
    for entry in policy.expired:
        if entry.origin.entry in seen or entry.expires is None:
            continue
        seen.add(entry.origin.entry)
        service = entry.origin.entry.split(".")[1] if entry.origin.entry.startswith("services.") else None
        yield _finding("expired", service, str(entry.network), entry.owner, entry.origin,
                       f"expired at {entry.expires:%Y-%m-%dT%H:%M:%S%z} and is no longer loaded",
                       "remove it from the file, or move expires forward if it is still needed")


class Holding(Struct, frozen=True):
    """One allow entry as its owner holds it: an inline entry or a whole file: list."""

    service: str
    subject: str
    entries: int
    review_by: date
    where: str
    reason: str
    # Past expires: no longer loaded, but still in the file, and `revoke --owner` removes it.
    expired: bool = False

    def to_data(self) -> dict[str, str | int | bool]:
        return {"service": self.service, "subject": self.subject, "entries": self.entries,
                "review_by": str(self.review_by), "where": self.where, "reason": self.reason,
                "expired": self.expired}


def holdings(policy: Policy) -> dict[str, list[Holding]]:
    """Per owner, sorted by name, what they hold in every service."""
    held: dict[str, list[Holding]] = {}
    for service in policy.services:
        parts: Iterable[Entry | ListFile] = service.entries.parts if isinstance(service.entries, Entries) \
            else service.entries
        for part in parts:
            if isinstance(part, Entry):
                holding = Holding(service.name, str(part.network), 1, part.review_by, str(part.origin), part.reason)
            else:
                where = str(part.origin) if part.origin is not None else part.path
                holding = Holding(service.name, f"file: {part.path}", len(part), part.review_by, where, part.reason)
            held.setdefault(part.owner, []).append(holding)
    expired: dict[tuple[str, str], list[Entry]] = {}
    for entry in policy.expired:
        expired.setdefault((entry.owner, str(entry.origin)), []).append(entry)
    for (owner, where), entries in expired.items():
        first = entries[0]
        service_name = first.origin.entry.split(".")[1] if first.origin.entry.startswith("services.") else "?"
        subject = str(first.network) if len(entries) == 1 else f"{first.origin.entry} ({len(entries)} entries)"
        held.setdefault(owner, []).append(
            Holding(service_name, subject, len(entries), first.review_by, where, first.reason, expired=True))
    return dict(sorted(held.items()))
