"""What hostwall puts in the kernel, as frozen data, and its rendering.

The rendering is nft's native syntax rather than libnftables JSON: native input loads
a 100k-element set faster (see README, "Native syntax, not JSON"), and nft 1.0.6's JSON
parser silently drops a table's comment, so it is not trusted with the label. Every
value that reaches the text is an integer-derived address, a number, or a name matched
against a strict pattern, so nothing an operator writes is interpreted by nft's own
parser.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import Literal

from msgspec import Struct
from msgspec.structs import force_setattr

from hostwall.cidr import LOW_IPV6, Interval, IntervalSet, format_address
from hostwall.policyspec import Action, PortRange

TABLE_FAMILY = "inet"
TABLE_NAME = "hostwall"
INGRESS_CHAIN = "ingress"
# raw priority: before conntrack (-200), so floods create no conntrack entries, and
# before DNAT (-100), so ports DNATed by Docker are covered too. Defragmentation (-400)
# runs first while conntrack is active; without it a first fragment still carries the
# ports (README, "Fragments").
INGRESS_PRIORITY = -300
LOG_PREFIX = "hostwall:"
# Appended to a service's log prefix for packets dropped by strict_source's reverse-path
# check, so their records say why (service names never hold ':').
SPOOFED_SUFFIX = ":spoofed"
# Holds one element, the number of the generation loaded, and in its comment the label
# of the full load that created it. The comment cannot change, but the element can, in
# the same batch as an element delta; deleting the old marker also guards a delta
# against a concurrent change.
GENERATION_SET = "generation"
# Each address set is two kernel sets: the single addresses in a hash set (one lookup,
# whatever its size), the wider ranges in an interval set. 100k entries as one interval
# set let 0.89-0.90 of the connections through that no firewall did; split, 0.93-0.94
# (tests/bench/bench_packet.py). The rest of hostwall sees one set per family.
HOSTS_SUFFIX = "_hosts"


def hosts_set_name(set_name: str) -> str:
    """The kernel's hash set that holds set_name's single addresses."""
    return set_name + HOSTS_SUFFIX


def logical_set_name(kernel_set: str) -> str:
    """The set a kernel set's elements belong to (its own name, or the one it holds
    the single addresses of)."""
    return kernel_set.removesuffix(HOSTS_SUFFIX)


class ServiceRules(Struct, frozen=True):
    """One service's chain and sets. v4 and v6 may be given as any sequence of
    intervals; they are held as IntervalSets (which compare equal to tuples)."""

    name: str
    ports: tuple[PortRange, ...]
    protocols: tuple[str, ...]
    action: Action
    v4: Sequence[Interval] = ()
    v6: Sequence[Interval] = ()
    entry_counters: bool = False
    log: Literal["off"] | int | None = None  # None: the ruleset's log_rate

    def __post_init__(self) -> None:
        for family, given in ((4, self.v4), (6, self.v6)):
            if not isinstance(given, IntervalSet) or given.family != family:
                force_setattr(self, f"v{family}", IntervalSet.of(family, given))

    @property
    def chain(self) -> str:
        return f"svc_{self.name}"

    def set_name(self, family: int) -> str:
        return f"{self.name}_v{family}"

    def intervals(self, family: int) -> IntervalSet:
        intervals = self.v4 if family == 4 else self.v6
        assert isinstance(intervals, IntervalSet)
        return intervals

    @property
    def accepted_counter(self) -> str:
        return f"{self.name}_accepted"

    @property
    def dropped_counter(self) -> str:
        return f"{self.name}_dropped"

    def structure(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ports": [[p.first, p.last] for p in self.ports],
            "protocols": list(self.protocols),
            "action": self.action,
            "timeouts": [self.has_timeouts(4), self.has_timeouts(6)],
            # Only when on, so that rulesets recorded before the option keep their digest.
            **({"entry_counters": True} if self.entry_counters else {}),
            **({"log": self.log} if self.log is not None else {}),
        }

    def has_timeouts(self, family: int) -> bool:
        return self.intervals(family).has_timeouts


# dict=True: room for the cached digest, which is no field (it takes no part in equality).
class Ruleset(Struct, frozen=True, dict=True):
    services: tuple[ServiceRules, ...]
    log_group: int = 100
    log_rate: int = 10
    log_burst: int = 20
    strict_source: bool = False

    def service(self, name: str) -> ServiceRules | None:
        return next((s for s in self.services if s.name == name), None)

    def structure(self) -> dict[str, object]:
        structure: dict[str, object] = {
            "services": [s.structure() for s in self.services],
            "log": [self.log_group, self.log_rate, self.log_burst],
        }
        # Present only when on, so that rulesets recorded before the setting existed keep
        # their digests.
        if self.strict_source:
            structure["strict_source"] = True
        return structure

    def to_data(self) -> dict[str, object]:
        """Everything as plain data (slow for large sets: one list per element)."""
        data = self.structure()
        data["elements"] = {
            s.set_name(family): [[i.first, i.last, _expiry_data(i.expires)] for i in s.intervals(family)]
            for s in self.services
            for family in (4, 6)
        }
        return data

    @classmethod
    def from_data(cls, data: dict[str, object]) -> Ruleset:
        services_data = data["services"]
        elements = data["elements"]
        log = data["log"]
        assert isinstance(services_data, list) and isinstance(elements, dict)
        assert isinstance(log, list)
        services = []
        for item in services_data:
            name = item["name"]

            def intervals(family: int, name: str = name) -> IntervalSet:
                return IntervalSet.of(family, (
                    Interval(family, first, last, math.inf if expires is None else float(expires))
                    for first, last, expires in elements[f"{name}_v{family}"]
                ))

            services.append(ServiceRules(
                name=name,
                ports=tuple(PortRange(first, last) for first, last in item["ports"]),
                protocols=tuple(item["protocols"]),
                action=item["action"],
                v4=intervals(4),
                v6=intervals(6),
                entry_counters=bool(item.get("entry_counters", False)),
                log=item.get("log"),
            ))
        return cls(tuple(services), int(log[0]), int(log[1]), int(log[2]), bool(data.get("strict_source", False)))

    def sets(self) -> dict[str, IntervalSet]:
        return {s.set_name(family): s.intervals(family) for s in self.services for family in (4, 6)}

    def to_record(self) -> tuple[dict[str, object], dict[str, IntervalSet]]:
        """What the state directory keeps: the structure as plain data, naming each set's
        digest, and the sets themselves (stored as bytes, shared between generations)."""
        sets = self.sets()
        data = self.structure()
        data["format"] = 2
        data["sets"] = {name: intervals.digest for name, intervals in sets.items()}
        return data, sets

    @classmethod
    def from_record(cls, data: Mapping[str, object], sets: Mapping[str, IntervalSet]) -> Ruleset:
        """Inverse of to_record; ValueError when a set is missing or is not the one named."""
        services_data, log, digests = data["services"], data["log"], data["sets"]
        assert isinstance(services_data, list) and isinstance(log, list) and isinstance(digests, dict)
        for name, digest in digests.items():
            if name not in sets or sets[name].digest != digest:
                raise ValueError(f"set {name} is missing or is not the one recorded")
        services = [
            ServiceRules(
                name=item["name"],
                ports=tuple(PortRange(first, last) for first, last in item["ports"]),
                protocols=tuple(item["protocols"]),
                action=item["action"],
                v4=sets[f"{item['name']}_v4"],
                v6=sets[f"{item['name']}_v6"],
                entry_counters=bool(item.get("entry_counters", False)),
                log=item.get("log"),
            )
            for item in services_data
        ]
        return cls(tuple(services), int(log[0]), int(log[1]), int(log[2]), bool(data.get("strict_source", False)))

    @cached_property
    def digest(self) -> str:
        """sha256 over the structure and each set's digest (see IntervalSet.digest): equal
        rulesets have equal digests, and a 100k-element set is hashed as bytes."""
        content = {"structure": self.structure(), "sets": {n: s.digest for n, s in self.sets().items()}}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def entry_count(self) -> int:
        return sum(len(s.v4) + len(s.v6) for s in self.services)


def _expiry_data(expires: float) -> int | float | None:
    if expires == math.inf:
        return None
    return int(expires) if expires.is_integer() else expires


class SetDelta(Struct, frozen=True):
    set_name: str
    add: tuple[Interval, ...]
    remove: tuple[Interval, ...]


class Delta(Struct, frozen=True):
    """One atomic element change, valid only while the kernel holds from_generation."""

    from_generation: int
    to_generation: int
    sets: tuple[SetDelta, ...]

    def size(self) -> int:
        return sum(len(s.add) + len(s.remove) for s in self.sets)


def element_delta(old: Ruleset, new: Ruleset, from_generation: int, to_generation: int, now: float) -> Delta:
    """The element changes that turn old's sets into new's; the structures must be equal.

    An element whose expiry changed is removed and added again: re-adding an existing
    element does not move its timeout. Elements that have already expired are gone from
    the kernel, so they are not removed again.
    """
    assert old.structure() == new.structure()
    changes = []
    for before, after in zip(old.services, new.services, strict=True):
        for family in (4, 6):
            removed, added = before.intervals(family).diff(after.intervals(family))
            add = tuple(i for i in added if i.expires > now)
            remove = tuple(i for i in removed if i.expires > now)
            if add or remove:
                changes.append(SetDelta(after.set_name(family), add, remove))
    return Delta(from_generation, to_generation, tuple(changes))


def table_comment(generation: int, digest: str) -> str:
    return f"hostwall generation={generation} sha256={digest}"


def render_full_load(ruleset: Ruleset, generation: int, now: float) -> str:
    """Everything hostwall puts in its table, to be loaded behind render_clearing()'s
    commands in the same transaction (the backend adds them: they depend on what the
    kernel holds at that moment, this text only on the generation, so it is recorded
    and replayed byte for byte)."""
    return "".join(_full_load_lines(ruleset, generation, now))


class TableObjects(Struct, frozen=True):
    """The names in the kernel's hostwall table that a full load replaces."""

    chains: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()  # named sets only: anonymous ones go with their rules
    counters: tuple[str, ...] = ()


def render_clearing(existing: TableObjects) -> str:
    """The start of a full-load transaction that replaces the table's contents in place.

    The table and its base chain are never deleted: a packet crossing the commit while
    two base chains share the hook reads the generation cursor once per chain, and can
    meet the old chain's next (empty) rules after the new chain's current (empty)
    ones, passing both. A set lookup also reads the cursor afresh, which is why the
    protected ports are matched by rules, not by a map: every verdict a packet gets in
    the base chain comes from one generation, and a set that misses mid-commit only
    ever causes a drop. Measured with SYNs sent during 4,000 reloads: replacing the
    table let 6 through, replacing the contents none (tests/netns/test_security_services.py).
    """
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    lines = [f"table {table} {{ {_base_chain_declaration()}; }}\n", f"flush table {table}\n"]
    lines += [f"delete chain {table} {name}\n" for name in existing.chains if name != INGRESS_CHAIN]
    lines += [f"delete set {table} {name}\n" for name in existing.sets]
    lines += [f"delete counter {table} {name}\n" for name in existing.counters]
    return "".join(lines)


def render_replacement() -> str:
    """The start of a full load that deletes and re-creates the table: only when the
    table cannot be cleared in place (its base chain was changed by hand). ``table
    ... {}`` first makes the delete valid when the table does not exist yet."""
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    return f"table {table} {{}}\ndelete table {table}\n"


def _base_chain_declaration() -> str:
    return (f"chain {INGRESS_CHAIN} {{ type filter hook prerouting priority {INGRESS_PRIORITY}; "
            "policy accept; }")


def render_removal() -> str:
    """Remove the hostwall table, whether or not it exists, in one transaction."""
    return render_replacement()


def _full_load_lines(ruleset: Ruleset, generation: int, now: float) -> Iterator[str]:
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    yield f"table {table} {{\n"
    # The generation set is re-created by every full load, so its comment (unlike the
    # table's, which cannot change) labels the load; deltas move only its element.
    yield (f"\tset {GENERATION_SET} {{\n\t\ttype mark\n"
           f'\t\tcomment "{table_comment(generation, ruleset.digest)}"\n'
           f"\t\telements = {{ {generation} }}\n\t}}\n")
    for service in ruleset.services:
        yield f"\tcounter {service.accepted_counter} {{}}\n"
        yield f"\tcounter {service.dropped_counter} {{}}\n"
        for family in (4, 6):
            yield from _set_lines(service, family, now)
    yield f"\tchain {INGRESS_CHAIN} {{\n"
    yield f"\t\ttype filter hook prerouting priority {INGRESS_PRIORITY}; policy accept;\n"
    yield '\t\tiif "lo" accept\n'
    # Rules, not a verdict map: see render_clearing.
    for service in ruleset.services:
        for protocol in service.protocols:
            for ports in service.ports:
                yield f"\t\t{protocol} dport {ports} jump {service.chain}\n"
    yield "\t}\n"
    for service in ruleset.services:
        yield from _service_chain_lines(ruleset, service)
    yield "}\n"


def _set_lines(service: ServiceRules, family: int, now: float) -> Iterator[str]:
    timeouts = service.has_timeouts(family)
    singles, ranges = service.intervals(family).partition_singles()
    yield f"\tset {hosts_set_name(service.set_name(family))} {{\n"
    yield f"\t\ttype ipv{family}_addr\n"
    if timeouts:
        yield "\t\tflags timeout\n"
    if service.entry_counters:
        yield "\t\tcounter\n"
    if singles:
        yield "\t\telements = { "
        yield ", ".join(host_texts(singles, now))
        yield " }\n"
    yield "\t}\n"
    # auto-merge would join an expiring element with a permanent neighbour and lose
    # its timeout; the compiler already merged, so it is only a safety net anyway.
    flags = "interval, timeout" if timeouts else "interval"
    yield f"\tset {service.set_name(family)} {{\n"
    yield f"\t\ttype ipv{family}_addr\n"
    yield f"\t\tflags {flags}\n"
    if service.entry_counters:
        # The kernel gives every element, including those a delta adds later, its own counter.
        yield "\t\tcounter\n"
    if not timeouts:
        yield "\t\tauto-merge\n"
    if ranges:
        yield "\t\telements = { "
        yield ", ".join(element_texts(ranges, now))
        yield " }\n"
    yield "\t}\n"


def _nft_duration(seconds: int) -> str:
    # nft's parser refuses a single unit of 10^8 or more ("value too large"), so a
    # timeout of years is written in days, hours, minutes and seconds.
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s"))
                   if value) or "1s"


def timeout_seconds(interval: Interval, now: float) -> int:
    # Whole seconds, rounded up, so that an entry never leaves the kernel early.
    return max(1, math.ceil(interval.expires - now))


def host_texts(singles: IntervalSet, now: float) -> list[str]:
    """Each single address as a hash set element: the address, and its timeout if any."""
    if singles.has_timeouts:
        return [render_host(interval, now) for interval in singles]
    ranges, ntop = singles.ranges, socket.inet_ntop
    if singles.family == 4:
        return [ntop(socket.AF_INET, ranges[offset:offset + 4]) for offset in range(0, len(ranges), 8)]
    return [ntop(socket.AF_INET6, ranges[offset:offset + 16]) if first >= LOW_IPV6 else format_address(6, first)
            for offset, first in zip(range(0, len(ranges), 32), singles.bounds()[0], strict=True)]


def render_host(interval: Interval, now: float) -> str:
    text = interval.first_address()
    if interval.expires != math.inf:
        text += f" timeout {_nft_duration(timeout_seconds(interval, now))}"
    return text


def render_element(interval: Interval, now: float) -> str:
    text = str(interval)
    if interval.expires != math.inf:
        text += f" timeout {_nft_duration(timeout_seconds(interval, now))}"
    return text



def element_texts(intervals: IntervalSet, now: float) -> Iterable[str]:
    """render_element of each interval; permanent sets, the bulk of large allowlists,
    are formatted straight from their records."""
    if intervals.has_timeouts:
        return [render_element(interval, now) for interval in intervals]
    return intervals.texts()


def _service_chain_lines(ruleset: Ruleset, service: ServiceRules) -> Iterator[str]:
    yield f"\tchain {service.chain} {{\n"
    dropped = f'counter name "{service.dropped_counter}"'
    # Only traffic to the host itself is dropped; forwarded traffic is none of hostwall's business.
    local_only = "\t\tfib daddr type != local return\n"
    rate = None if service.log == "off" else ruleset.log_rate if service.log is None else service.log
    if ruleset.strict_source:
        yield local_only
        # Before the allowlist: an allowed address arriving on a link the host would not
        # answer it through is spoofed. Logged (rate-limited like every drop) with a
        # prefix of its own: the source is forged, but that it happens, and on which
        # link, is what an operator needs to see.
        spoofed = "fib saddr . iif oif missing"
        if rate is not None:
            yield (f"\t\t{spoofed} limit rate {rate}/second burst {ruleset.log_burst} packets "
                   f'log prefix "{LOG_PREFIX}{service.name}{SPOOFED_SUFFIX}" group {ruleset.log_group}\n')
        yield f"\t\t{spoofed} {dropped} drop\n"
    # Otherwise the allowlist comes before the route lookup, so that an allowed packet
    # needs none (bench_packet.py); forwarded traffic from an allowed address then
    # counts as accepted.
    for family, match in ((4, "ip saddr"), (6, "ip6 saddr")):
        for name in (hosts_set_name(service.set_name(family)), service.set_name(family)):
            yield f'\t\t{match} @{name} counter name "{service.accepted_counter}" accept\n'
    if not ruleset.strict_source:
        yield local_only
    if rate is not None:
        yield (
            f"\t\tlimit rate {rate}/second burst {ruleset.log_burst} packets "
            f'log prefix "{LOG_PREFIX}{service.name}" group {ruleset.log_group}\n'
        )
    if service.action == "reject":
        yield f"\t\tmeta l4proto tcp {dropped} reject with tcp reset\n"
        yield f"\t\t{dropped} reject with icmpx type port-unreachable\n"
    else:
        yield f"\t\t{dropped} drop\n"
    yield "\t}\n"
