"""Which packets to send and what the policy says about each. Pure.

The expected answer is computed from the policy's entries, not from the compiled
ruleset: verify exists to catch a compiler that merges wrongly, so it must not share
the compiler's merge. It is the answer `check` gives (a unit test holds them equal),
looked up by bisection so that 100k entries cost no more than a sort.
"""

from __future__ import annotations

import bisect
import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence

from msgspec import Struct, field

from hostwall.cidr import Interval, IntervalSet
from hostwall.policy import Entries, Policy, Service

MAX_ADDRESS = {4: (1 << 32) - 1, 6: (1 << 128) - 1}
DEFAULT_SAMPLES = 20_000
RANDOM_PER_FAMILY = 16
MAPPED_PROBES = 4
LINK_LOCAL_PER_FAMILY = 4
UNPROTECTED_FROM = 8080

# Sources the receiving kernel discards before any firewall verdict matters (martians),
# so a packet from them says nothing about the ruleset.
_UNOBSERVABLE = (
    ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("224.0.0.0/3"),
    ipaddress.ip_network("::/127"), ipaddress.ip_network("ff00::/8"),
)
_UNOBSERVABLE_RANGES = tuple((n.version, int(n.network_address), int(n.broadcast_address)) for n in _UNOBSERVABLE)
_MAPPED_FIRST = int(ipaddress.ip_address("::ffff:0.0.0.0"))
_MAPPED_LAST = int(ipaddress.ip_address("::ffff:255.255.255.255"))
_LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/64")}


def observable(family: int, address: int) -> bool:
    return not any(f == family and first <= address <= last for f, first, last in _UNOBSERVABLE_RANGES)


class Target(Struct, frozen=True):
    """A protected or unprotected destination port and its transport."""

    port: int
    protocol: str  # tcp or udp
    service: str | None  # None: no service claims it

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


class Probe(Struct, frozen=True):
    family: int
    address: int
    target: Target
    expected: bool  # True: the policy admits it
    why: str  # how the address was chosen

    @property
    def address_text(self) -> str:
        if self.family == 4:
            return str(ipaddress.IPv4Address(self.address))
        address = ipaddress.IPv6Address(self.address)
        return f"::ffff:{address.ipv4_mapped}" if address.ipv4_mapped is not None else str(address)


class PolicyIndex:
    """The policy's answer to "does service S admit this source", by bisection over its
    own entries (unmerged)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._index: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for service in policy.services:
            for family in (4, 6):
                spans = sorted(_spans(service, family))
                firsts, reach = [], []
                furthest = -1
                for first, last in spans:
                    furthest = max(furthest, last)
                    firsts.append(first)
                    reach.append(furthest)
                self._index[(service.name, family)] = (firsts, reach)

    def service_for(self, port: int, protocol: str) -> Service | None:
        for service in self.policy.services:
            if protocol in service.protocols and any(p.contains(port) for p in service.ports):
                return service
        return None

    def covered(self, service: str, family: int, address: int) -> bool:
        firsts, reach = self._index.get((service, family), ([], []))
        position = bisect.bisect_right(firsts, address) - 1
        return position >= 0 and reach[position] >= address

    def admits(self, family: int, address: int, target: Target) -> bool:
        """check_policy's answer for the source family/address and target."""
        if target.service is None:
            return True
        if (family == 4 and address >> 24 == 127) or (family == 6 and address == 1):
            return True
        if family == 6 and _MAPPED_FIRST <= address <= _MAPPED_LAST:
            return False
        return self.covered(target.service, family, address)


def _spans(service: Service, family: int) -> list[tuple[int, int]]:
    """First and last address of each of the service's entries. A `file:` list's lines
    are read from the bytes its loader parsed them into (every line, unmerged), not
    made into 100k Entry objects."""
    entries = service.entries
    if not isinstance(entries, Entries):
        return [(e.interval.first, e.interval.last) for e in entries if e.interval.family == family]
    spans = [(e.interval.first, e.interval.last) for e in entries.inline if e.interval.family == family]
    for part in entries.lists:
        firsts, lasts = IntervalSet(family, part.parsed.lines(family)).bounds()
        spans.extend(zip(firsts, lasts, strict=True))
    return spans


def service_targets(service: Service) -> list[Target]:
    """Both ends of each of the service's port ranges, for each of its protocols."""
    targets: list[Target] = []
    for protocol in service.protocols:
        for ports in service.ports:
            for port in dict.fromkeys((ports.first, ports.last)):
                targets.append(Target(port, protocol, service.name))
    return targets


def unprotected_target(policy: Policy) -> Target:
    """The first TCP port from 8080 up that no service claims."""
    port = UNPROTECTED_FROM
    while any("tcp" in s.protocols and any(p.contains(port) for p in s.ports) for s in policy.services):
        port = port + 1 if port < 65535 else 1
    return Target(port, "tcp", None)


class Element(Struct, frozen=True):
    service: str
    family: int
    first: int
    last: int


class ProbePlan(Struct):
    probes: list[Probe]
    elements_total: int
    elements_probed: int
    unobservable: int = 0  # probes left out: martian sources the kernel discards anyway
    targets: list[Target] = field(default_factory=list)

    @property
    def sampled(self) -> bool:
        return self.elements_probed < self.elements_total


def elements_of(sets: Mapping[str, Sequence[Interval]], services: Iterable[str]) -> list[Element]:
    """Each interval of the per-service address sets (named service_v4, service_v6)."""
    elements: list[Element] = []
    for service in services:
        for family in (4, 6):
            for interval in sets.get(f"{service}_v{family}", ()):
                elements.append(Element(service, family, interval.first, interval.last))
    return elements


def sample(elements: list[Element], limit: int, rng: random.Random) -> list[Element]:
    """At most about `limit` elements, each (service, family) stratum in proportion to its
    size and never empty, so a small service is not lost behind a large one."""
    if len(elements) <= limit:
        return elements
    strata: dict[tuple[str, int], list[Element]] = {}
    for element in elements:
        strata.setdefault((element.service, element.family), []).append(element)
    chosen: list[Element] = []
    for key in sorted(strata):
        members = strata[key]
        share = max(1, round(limit * len(members) / len(elements)))
        chosen.extend(rng.sample(members, min(share, len(members))))
    return chosen


def _random_address(family: int, rng: random.Random) -> int:
    while True:
        address = rng.getrandbits(32) if family == 4 else (0x2 << 124) | rng.getrandbits(125)
        if observable(family, address):
            return address


def plan_probes(policy: Policy, elements: list[Element], limit: int = DEFAULT_SAMPLES,
                rng: random.Random | None = None) -> ProbePlan:
    """Probes for the kernel elements (first and last address, and the ones just outside),
    random sources of both families, IPv4-mapped and link-local sources, on every
    protected port and one that is not; each with the policy's answer."""
    rng = rng or random.Random(0)
    index = PolicyIndex(policy)
    targets = {s.name: service_targets(s) for s in policy.services}
    every = [t for s in policy.services for t in targets[s.name]] + [unprotected_target(policy)]
    unique = list(dict.fromkeys(elements))
    chosen = sample(unique, limit, rng)
    planned: dict[tuple[int, int, Target], Probe] = {}
    skipped = 0
    mapped = 0  # elements whose first address is also sent in its IPv4-mapped IPv6 form

    def add(family: int, address: int, target: Target, why: str) -> None:
        nonlocal skipped
        if not 0 <= address <= MAX_ADDRESS[family]:
            return
        key = (family, address, target)
        if key in planned:
            return
        if not observable(family, address):
            skipped += 1
            return
        planned[key] = Probe(family, address, target, index.admits(family, address, target), why)

    for element in chosen:
        where = f"{element.service}_v{element.family} element {_span(element)}"
        for target in targets.get(element.service, ()):
            add(element.family, element.first, target, f"first of {where}")
            add(element.family, element.last, target, f"last of {where}")
            add(element.family, element.first - 1, target, f"just below {where}")
            add(element.family, element.last + 1, target, f"just above {where}")
        if element.family == 4 and mapped < MAPPED_PROBES:
            mapped += 1
            for target in targets.get(element.service, ()):
                add(6, _MAPPED_FIRST + element.first, target, f"IPv4-mapped form of {where}")
    for family in (4, 6):
        for _ in range(RANDOM_PER_FAMILY):
            address = _random_address(family, rng)
            for target in every:
                add(family, address, target, "random source")
        link_local = _LINK_LOCAL[family]
        for _ in range(LINK_LOCAL_PER_FAMILY):
            address = int(link_local.network_address) + rng.randrange(1, link_local.num_addresses - 1)
            for target in every:
                add(family, address, target, "link-local source")
    for _ in range(MAPPED_PROBES):
        address = _MAPPED_FIRST + _random_address(4, rng)
        # Not to the unprotected port: Linux's TCP discards SYNs from IPv4-mapped
        # sources itself, so nothing there could answer whatever the ruleset does.
        for target in every[:-1]:
            add(6, address, target, "IPv4-mapped source")
    return ProbePlan(list(planned.values()), len(unique), len(chosen), skipped, every)


def _span(element: Element) -> str:
    return str(Interval(element.family, element.first, element.last))
