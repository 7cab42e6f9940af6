"""Observations against the policy's answers, and what an operator needs to fix a
difference: the address, the port, both answers and the entry involved. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hostwall.policy import Entry, Policy
from hostwall.verify.probes import Probe, ProbePlan


@dataclass(frozen=True)
class Mismatch:
    probe: Probe
    observed: bool
    entry: str  # "file:line (owner)" of the entry involved, or "-"

    def row(self) -> list[str]:
        return [self.probe.address_text, str(self.probe.target), _word(self.probe.expected), _word(self.observed),
                self.entry, self.probe.why]


@dataclass(frozen=True)
class Report:
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


def involved_entry(policy: Policy, probe: Probe) -> str:
    """The entry that admits the address, or for a denied one the entry it borders
    (the probes just outside an element), or '-'."""
    service = next((s for s in policy.services if s.name == probe.target.service), None)
    if service is None:
        return "-"
    best: Entry | None = None
    distance = 2
    for entry in service.entries:
        interval = entry.interval
        if interval.family != probe.family:
            continue
        gap = 0 if interval.first <= probe.address <= interval.last else min(
            abs(interval.first - probe.address), abs(interval.last - probe.address))
        if gap < distance:
            best, distance = entry, gap
            if gap == 0:
                break
    return f"{best.origin} ({best.owner})" if best is not None else "-"


def compare(policy: Policy, plan: ProbePlan, observed: Sequence[bool]) -> Report:
    mismatches = tuple(Mismatch(probe, seen, involved_entry(policy, probe))
                       for probe, seen in zip(plan.probes, observed, strict=True) if probe.expected != seen)
    return Report(len(plan.probes), plan.elements_total, plan.elements_probed, plan.unobservable, mismatches)
