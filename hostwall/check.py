"""Would a packet from ADDRESS to PORT/PROTO reach the service? Answered from the policy
(no root) and, when readable, from the kernel's sets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hostwall.kernel import KernelTable
from hostwall.policy import Entry, Policy, Service


@dataclass(frozen=True)
class Decision:
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


def _service_for(policy: Policy, port: int, protocol: str) -> Service | None:
    for service in policy.services:
        if protocol in service.protocols and any(p.contains(port) for p in service.ports):
            return service
    return None


def check_policy(policy: Policy, address: str, port_spec: str) -> Decision:
    parsed, port, protocol = parse_target(address, port_spec)
    service = _service_for(policy, port, protocol)
    if service is None:
        return Decision(True, f"{port}/{protocol} is not a protected port", None)
    if parsed.is_loopback:
        return Decision(True, "loopback traffic is always allowed", service.name)
    mapped = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else None
    if mapped is not None:
        return Decision(False, "IPv4-mapped IPv6 sources are never on an allowlist", service.name)
    value = int(parsed)
    matches = tuple(
        e for e in service.entries if e.interval.family == parsed.version and e.interval.contains(value)
    )
    if matches:
        return Decision(True, f"allowed by service {service.name}", service.name, matches)
    return Decision(False, f"no allow entry of service {service.name} covers {parsed}", service.name)


def check_kernel(kernel: KernelTable, service_name: str, address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    if parsed.is_loopback:
        return True
    sets = kernel.sets or {}
    name = f"{service_name}_v{parsed.version}"
    value = int(parsed)
    return any(i.contains(value) for i in sets.get(name, ()))
