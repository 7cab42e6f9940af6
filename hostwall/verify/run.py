"""verify from end to end: the policy and the kernel's elements in, a report out.
The prober is injected (the replica, or a fake in unit tests)."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from hostwall.cidr import Interval
from hostwall.policy import Policy
from hostwall.verify.probes import DEFAULT_SAMPLES, Probe, elements_of, plan_probes
from hostwall.verify.report import Report, compare

# The replica's own addresses: from the benchmarking ranges, moved along when a probe
# uses one as its source (a packet from the host's own address is a martian).
_DESTINATION_BASE = {4: int(ipaddress.ip_address("198.18.0.1")), 6: int(ipaddress.ip_address("2001:db8:ffff::1"))}

class Prober(Protocol):
    """What sends the probes: the replica (hostwall.verify.replica), or a fake."""

    def observe(self, probes: Sequence[Probe]) -> list[bool]:
        """For each probe, whether the service answered it (True) or it was dropped."""


OpenProber = Callable[[dict[int, str], Sequence[int], Sequence[int]], AbstractContextManager[Prober]]


def destinations(probes: Sequence[Probe]) -> dict[int, str]:
    used = {(p.family, p.address) for p in probes}
    chosen = {}
    for family, base in _DESTINATION_BASE.items():
        address = base
        while (family, address) in used:
            address += 1
        chosen[family] = str(ipaddress.ip_address(address))
    return chosen


def verify(policy: Policy, expected_sets: Mapping[str, Sequence[Interval]],
           kernel_sets: Mapping[str, Sequence[Interval]] | None, open_prober: OpenProber,
           samples: int = DEFAULT_SAMPLES, seed: int | None = None) -> Report:
    """expected_sets: the policy compiled; kernel_sets: the sets as the kernel lists them.
    Both are probed, so an element missing from the kernel and one added behind
    hostwall's back are both met."""
    names = [s.name for s in policy.services]
    elements = elements_of(expected_sets, names) + elements_of(kernel_sets or {}, names)
    plan = plan_probes(policy, elements, samples, random.Random(seed))
    tcp_ports = sorted({p.target.port for p in plan.probes if p.target.protocol == "tcp"})
    udp_ports = sorted({p.target.port for p in plan.probes if p.target.protocol == "udp"})
    with open_prober(destinations(plan.probes), tcp_ports, udp_ports) as prober:
        observed = prober.observe(plan.probes)
    return compare(policy, plan, observed)
