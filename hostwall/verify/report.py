"""Observations against the policy's answers, and what an operator needs to fix a
difference: the address, the port, both answers and the entry involved. Pure."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from msgspec import Struct

from hostwall.policy import Entry, Policy
from hostwall.verify.probes import Probe, ProbePlan


class Mismatch(Struct, frozen=True):
    probe: Probe
    observed: bool
    entry: str  # "file:line (owner)" of the entry involved, or "-"

    def row(self) -> list[str]:
        return [self.probe.address_text, str(self.probe.target), _word(self.probe.expected), _word(self.observed),
                self.entry, self.probe.why]


class Report(Struct, frozen=True):
    probes: int
    elements_total: int
    elements_probed: int
    unobservable: int
    mismatches: tuple[Mismatch, ...]

    @property
    def agrees(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        scope = (f"{self.elements_probed} of {self.elements_total} kernel elements (sampled by service and family)"
                 if self.elements_probed < self.elements_total else f"all {self.elements_total} kernel elements")
        verdict = ("the replica agrees with the policy" if self.agrees
                   else f"{len(self.mismatches)} probe(s) differ from the policy")
        return f"{self.probes} probes from {scope}: {verdict}"

    def to_json(self) -> dict[str, Any]:
        return {
            "agrees": self.agrees, "probes": self.probes, "elements_total": self.elements_total,
            "elements_probed": self.elements_probed, "sampled": self.elements_probed < self.elements_total,
            "unobservable": self.unobservable,
            "mismatches": [{"address": m.probe.address_text, "port": m.probe.target.port,
                            "protocol": m.probe.target.protocol, "service": m.probe.target.service,
                            "expected": _word(m.probe.expected), "observed": _word(m.observed),
                            "entry": m.entry, "why": m.probe.why} for m in self.mismatches],
        }


HEADERS = ["address", "port", "expected", "observed", "entry", "probe"]


def _word(admitted: bool) -> str:
    return "admitted" if admitted else "denied"


class EntryIndex:
    """Per service and family, the policy's entries sorted by first address: the entry
    involved in a mismatch is found by bisection, so a table that is wrong everywhere
    still reports in seconds."""

    def __init__(self, policy: Policy) -> None:
        self._entries: dict[tuple[str, int], tuple[list[int], list[Entry]]] = {}
        for service in policy.services:
            for family in (4, 6):
                ordered = sorted((e for e in service.entries if e.interval.family == family),
                                 key=lambda e: (e.interval.first, e.interval.last))
                self._entries[(service.name, family)] = ([e.interval.first for e in ordered], ordered)

    def involved(self, probe: Probe) -> str:
        """The entry that admits the address, or for a denied one the entry it borders
        (the probes just outside an element), or '-'."""
        if probe.target.service is None:
            return "-"
        firsts, entries = self._entries.get((probe.target.service, probe.family), ([], []))
        position = bisect.bisect_right(firsts, probe.address)
        best: Entry | None = None
        distance = 2
        # Entries that start after the address can only border it (the next one); those
        # that start before may contain it, the nearest first.
        candidates = entries[max(0, position - SCAN):position][::-1] + entries[position:position + 1]
        for entry in candidates:
            interval = entry.interval
            gap = 0 if interval.first <= probe.address <= interval.last else min(
                abs(interval.first - probe.address), abs(interval.last - probe.address))
            if gap < distance:
                best, distance = entry, gap
                if gap == 0:
                    break
        return printable(f"{best.origin} ({best.owner})") if best is not None else "-"


SCAN = 64  # entries before the address looked at for one that contains it (nesting depth)


def printable(text: str) -> str:
    """A file name may hold control characters; a terminal or journal line must not."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def compare(policy: Policy, plan: ProbePlan, observed: Sequence[bool]) -> Report:
    differing = [(probe, seen) for probe, seen in zip(plan.probes, observed, strict=True) if probe.expected != seen]
    index = EntryIndex(policy) if differing else None
    mismatches = tuple(Mismatch(probe, seen, index.involved(probe) if index else "-") for probe, seen in differing)
    return Report(len(plan.probes), plan.elements_total, plan.elements_probed, plan.unobservable, mismatches)
