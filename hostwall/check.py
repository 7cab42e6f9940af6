"""Would a packet from ADDRESS to PORT/PROTO reach the service? Answered from the policy
(no root) and, when readable, from the kernel's sets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from msgspec import Struct

from hostwall.cidr import Interval
from hostwall.kernel import KernelTable
from hostwall.policy import Entry, Policy, Service
from hostwall.ruleset import Ruleset


class Decision(Struct, frozen=True):
    allowed: bool
    reason: str
    service: str | None
    entries: tuple[Entry, ...] = ()


class AddressError(ValueError):
    pass


def parse_target(address: str, port_spec: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, str]:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise AddressError(f"{address!r} is not an IPv4 or IPv6 address") from None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.scope_id:
        raise AddressError(f"{address!r}: drop the %zone, sources are matched without it")
    port_text, _, protocol = port_spec.partition("/")
    protocol = protocol or "tcp"
    if protocol not in ("tcp", "udp"):
        raise AddressError(f"protocol {protocol!r}: use tcp or udp, e.g. 443/udp")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise AddressError(f"port {port_text!r}: use a number from 1 to 65535")
    return parsed, int(port_text), protocol


def parse_source(address: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A single address, or a CIDR whose every address is asked about."""
    if "/" not in address:
        parsed = parse_target(address, "1")[0]
        return ipaddress.ip_network(parsed)
    try:
        network = ipaddress.ip_network(address)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            loose = ipaddress.ip_network(address, strict=False)
            raise AddressError(f"{address!r} has host bits set: write {loose}") from None
        raise AddressError(f"{address!r} is not an IPv4 or IPv6 address or CIDR") from None
    return network


def _parse_port(port_spec: str) -> tuple[int, str]:
    _, port, protocol = parse_target("127.0.0.1", port_spec)
    return port, protocol


def _service_for(policy: Policy, port: int, protocol: str) -> Service | None:
    for service in policy.services:
        if protocol in service.protocols and any(p.contains(port) for p in service.ports):
            return service
    return None


def first_gap(intervals: Iterable[Interval], first: int, last: int) -> int | None:
    """The lowest address of first..last that no interval covers, or None when all are."""
    reached = first
    for interval in sorted(intervals, key=lambda i: i.first):
        if interval.first > reached:
            break
        reached = max(reached, interval.last + 1)
        if reached > last:
            return None
    return reached


MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def check_policy(policy: Policy, address: str, port_spec: str) -> Decision:
    network = parse_source(address)
    port, protocol = _parse_port(port_spec)
    service = _service_for(policy, port, protocol)
    if service is None:
        return Decision(True, f"{port}/{protocol} is not a protected port", None)
    if network.is_loopback:
        return Decision(True, "loopback traffic is always allowed", service.name)
    if isinstance(network, ipaddress.IPv6Network) and network.overlaps(MAPPED):
        return Decision(False, "IPv4-mapped IPv6 sources are never on an allowlist", service.name)
    first, last = int(network.network_address), int(network.broadcast_address)
    matches = tuple(
        e for e in service.entries
        if e.interval.family == network.version and e.interval.first <= last and first <= e.interval.last
    )
    gap = first_gap((e.interval for e in matches), first, last)
    single = network.num_addresses == 1
    subject = str(network.network_address) if single else str(network)
    if gap is None:
        reason = f"allowed by service {service.name}" if single else (
            f"every address of {subject} is allowed by service {service.name}")
        return Decision(True, reason, service.name, matches)
    if single or not matches:
        return Decision(False, f"no allow entry of service {service.name} covers {subject}", service.name)
    uncovered = ipaddress.ip_address(gap) if network.version == 4 else ipaddress.IPv6Address(gap)
    return Decision(False, f"{subject} is only partly allowed by service {service.name}: {uncovered} is "
                    f"covered by no entry (the entries below cover the rest of it, in part)",
                    service.name, matches)


def check_kernel(kernel: KernelTable, service_name: str, address: str) -> bool:
    network = parse_source(address)
    if network.is_loopback:
        return True
    sets = kernel.sets or {}
    name = f"{service_name}_v{network.version}"
    first, last = int(network.network_address), int(network.broadcast_address)
    return first_gap(sets.get(name, ()), first, last) is None


NEIGHBOUR_PREFIX = {4: 16, 6: 48}
NEIGHBOURS_SHOWN = 5


class Neighbour(Struct, frozen=True):
    """An entry near a denied address, and why it is shown."""

    service: str
    entry: Entry
    why: str  # "same /16", "same owner as a nearby entry", "allows it for another service"


class Explanation(Struct, frozen=True):
    decision: Decision
    address: str
    port: int
    protocol: str
    steps: tuple[str, ...]
    merged: Interval | None = None  # the kernel element that holds the address
    merged_entries: int = 0  # how many entries of the service lie in that element
    neighbours: tuple[Neighbour, ...] = ()


def _distance(entry: Entry, value: int) -> int:
    interval = entry.interval
    return 0 if interval.first <= value <= interval.last else min(abs(interval.first - value),
                                                                 abs(interval.last - value))


def explain(policy: Policy, ruleset: Ruleset, address: str, port_spec: str) -> Explanation:
    """check_policy's answer with the reasoning behind it: the service the port belongs
    to, the entries and the merged kernel element that match, and for a denial the
    entries that might have been meant."""
    if "/" in address and parse_source(address).num_addresses > 1:
        raise AddressError(f"--why explains one address, not the range {address}; check the range without it")
    decision = check_policy(policy, address, port_spec)
    parsed, port, protocol = parse_target(address.partition("/")[0], port_spec)
    value, family = int(parsed), parsed.version
    steps: list[str] = []
    service = _service_for(policy, port, protocol)
    if service is None:
        protected = ", ".join(f"{s.name} {','.join(map(str, s.ports))}/{'+'.join(s.protocols)}"
                              for s in policy.services)
        steps.append(f"{port}/{protocol} belongs to no service (protected: {protected}); hostwall lets it pass")
        return Explanation(decision, str(parsed), port, protocol, tuple(steps))
    steps.append(f"{port}/{protocol} belongs to service {service.name} "
                 f"(ports {','.join(map(str, service.ports))}/{'+'.join(service.protocols)}, "
                 f"defined {service.defined_in}, action {service.action})")
    if not decision.entries:
        steps.append(decision.reason)
        if decision.allowed or decision.service is None:
            return Explanation(decision, str(parsed), port, protocol, tuple(steps))
        steps.append(f"so the packet meets the chain's final {service.action}")
        return Explanation(decision, str(parsed), port, protocol, tuple(steps),
                           neighbours=_neighbours(policy, service, value, family))
    for entry in decision.entries:
        steps.append(f"{parsed} is inside {entry.network}, {entry.origin}, owner {entry.owner}: "
                     f"{entry.reason} (review by {entry.review_by})")
    rules = ruleset.service(service.name)
    merged: Interval | None = None
    count = 0
    if rules is not None:
        merged = next((i for i in rules.intervals(family) if i.contains(value)), None)
    if merged is not None:
        count = sum(1 for e in service.entries
                    if e.interval.family == family and merged.first <= e.interval.first <= merged.last)
        steps.append(f"in the kernel it is part of the element {merged} of set {service.name}_v{family}, "
                     f"merged from {count} entr{'y' if count == 1 else 'ies'}")
    steps.append(f"so the chain svc_{service.name} accepts it")
    return Explanation(decision, str(parsed), port, protocol, tuple(steps), merged, count)


def _neighbours(policy: Policy, service: Service, value: int, family: int) -> tuple[Neighbour, ...]:
    shift = (32 if family == 4 else 128) - NEIGHBOUR_PREFIX[family]
    found: list[Neighbour] = []
    for other in policy.services:
        if other is service:
            continue
        for entry in other.entries:
            if entry.interval.family == family and entry.interval.contains(value):
                found.append(Neighbour(other.name, entry, f"allows it for service {other.name}"))
    near = sorted((e for e in service.entries
                   if e.interval.family == family and e.interval.first >> shift <= value >> shift
                   <= e.interval.last >> shift), key=lambda e: _distance(e, value))[:NEIGHBOURS_SHOWN]
    found.extend(Neighbour(service.name, e, f"same /{NEIGHBOUR_PREFIX[family]}") for e in near)
    owners = {n.entry.owner for n in found}
    shown = {id(n.entry) for n in found}
    same_owner = sorted((e for e in service.entries if e.owner in owners and id(e) not in shown),
                        key=lambda e: (e.interval.family != family, _distance(e, value)))[:NEIGHBOURS_SHOWN]
    found.extend(Neighbour(service.name, e, f"same owner ({e.owner}) as an entry above") for e in same_owner)
    return tuple(found)
