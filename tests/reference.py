"""An independent model of what a policy allows, and random policies to hold hostwall to it.

The reference matcher knows nothing of hostwall's parser, compiler or interval code:
it reads the entries a generated policy was built from, with the ipaddress module,
and decides allow/deny for (address, port, protocol) by the rules in the README. The
differential tests compare it with the compiled ruleset (tests/unit) and with the
sets read back from the kernel (tests/netns).

Example counts come from a hypothesis profile: small by default, so the suite stays
within its time budget, and ten times larger with HOSTWALL_HYPOTHESIS=bench (what
`make bench` sets).
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile("ci", deadline=None, database=None, print_blob=True)
settings.register_profile("bench", deadline=None, database=None, print_blob=True)
PROFILE = os.environ.get("HOSTWALL_HYPOTHESIS", "ci")
settings.load_profile(PROFILE)
SCALE = 10 if PROFILE == "bench" else 1


def examples(ci: int) -> settings:
    """Settings for a property run: ci examples by default, SCALE times more under bench."""
    return settings(max_examples=ci * SCALE, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PERMANENT = math.inf
BUILTIN = {"https": (((443, 443),), ("tcp", "udp")), "postgres": (((5432, 5432),), ("tcp",))}


@dataclass(frozen=True)
class RefEntry:
    network: Network
    expires: datetime | None = None


@dataclass(frozen=True)
class RefService:
    name: str
    ports: tuple[tuple[int, int], ...]
    protocols: tuple[str, ...]
    entries: tuple[RefEntry, ...] = ()

    def covers(self, port: int, protocol: str) -> bool:
        return protocol in self.protocols and any(first <= port <= last for first, last in self.ports)


@dataclass(frozen=True)
class Reference:
    services: tuple[RefService, ...]

    def service_for(self, port: int, protocol: str) -> RefService | None:
        return next((s for s in self.services if s.covers(port, protocol)), None)

    def expiry(self, service: RefService, family: int, address: int, now: datetime) -> float | None:
        """None: denied; else the unix time the address stops being allowed (inf: never)."""
        found: float | None = None
        for entry in service.entries:
            if entry.network.version != family:
                continue
            if not int(entry.network.network_address) <= address <= int(entry.network.broadcast_address):
                continue
            if entry.expires is not None and entry.expires <= now:
                continue
            until = PERMANENT if entry.expires is None else entry.expires.timestamp()
            found = until if found is None else max(found, until)
        return found

    def allows(self, address: str, port: int, protocol: str, now: datetime) -> bool:
        parsed = ipaddress.ip_address(address)
        service = self.service_for(port, protocol)
        if service is None or parsed.is_loopback:
            return True
        return self.expiry(service, parsed.version, int(parsed), now) is not None

    def breakpoints(self, service: RefService, family: int) -> set[int]:
        points: set[int] = set()
        for entry in service.entries:
            if entry.network.version == family:
                points.update(_around(int(entry.network.network_address), int(entry.network.broadcast_address),
                                      family))
        return points


def _around(first: int, last: int, family: int) -> Iterator[int]:
    top = (1 << (32 if family == 4 else 128)) - 1
    for point in (first - 1, first, last, last + 1):
        if 0 <= point <= top:
            yield point


def range_breakpoints(ranges: Iterable[tuple[int, int]], family: int) -> set[int]:
    return {point for first, last in ranges for point in _around(first, last, family)}


def mismatches(reference: Reference, service: RefService, family: int,
               actual: list[tuple[int, int, float]], now: datetime, tolerance: float = 0.0) -> list[str]:
    """Where actual (first, last, expiry) ranges and the reference disagree.

    Both sides are constant between consecutive breakpoints of either, so comparing at
    every breakpoint decides equality over the whole address space.
    """
    spans = ((first, last) for first, last, _ in actual)
    points = reference.breakpoints(service, family) | range_breakpoints(spans, family)
    ordered = sorted(actual)
    problems = []
    for point in sorted(points):
        want = reference.expiry(service, family, point, now)
        have = next((e for first, last, e in ordered if first <= point <= last), None)
        same = (want is None) == (have is None) and (
            want is None or have is None or want == have
            or (math.isfinite(want) and math.isfinite(have) and abs(want - have) <= tolerance))
        if not same:
            shown = ipaddress.ip_address(point) if family == 6 or point > 0 else ipaddress.IPv4Address(point)
            problems.append(f"{service.name} v{family} {shown}: reference {want}, actual {have}")
    return problems


# --- random policies ---------------------------------------------------------------------

# Small regions, so that random prefixes overlap, nest and touch often; all of them
# documentation or private space, so real packets from them stay inside the lab.
V4_POOLS = ("10.0.0.0", "192.0.2.0", "198.51.100.0", "203.0.113.0")
V6_POOLS = ("2001:db8::", "fd00::")
V4_EDGES = ("255.255.255.255/32", "255.255.255.0/24", "0.0.0.0/8", "128.0.0.0/1")
V6_EDGES = ("ffff::/16", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "2000::/3", "fe80::/10")


@st.composite
def networks(draw: st.DrawFn, *, lab_safe: bool = False) -> Network:
    if not lab_safe and draw(st.integers(0, 15)) == 0:
        return ipaddress.ip_network(draw(st.sampled_from(V4_EDGES + V6_EDGES)))
    if draw(st.booleans()):
        base = int(ipaddress.IPv4Address(draw(st.sampled_from(V4_POOLS))))
        span = 8  # a /24 region
        length = draw(st.integers(32 - span, 32))
        offset = draw(st.integers(0, (1 << span) - 1))
        value = (base + offset) & ~((1 << (32 - length)) - 1)
        return ipaddress.IPv4Network((value, length))
    base = int(ipaddress.IPv6Address(draw(st.sampled_from(V6_POOLS))))
    span = 10
    length = draw(st.integers(128 - span, 128))
    offset = draw(st.integers(0, (1 << span) - 1))
    value = (base + offset) & ~((1 << (128 - length)) - 1)
    return ipaddress.IPv6Network((value, length))


@dataclass
class GeneratedPolicy:
    """Policy files (name -> text) and the reference model they were written from."""

    files: dict[str, str]
    reference: Reference
    now: datetime
    lists: dict[str, str] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        for old in directory.iterdir():
            old.unlink()
        for name, text in {**self.files, **self.lists}.items():
            (directory / name).write_bytes(text.encode())


def _expiry(now: datetime, choice: int) -> datetime | None:
    # 0: permanent; 1: already expired (must not be loaded); 2-4: days ahead, whole
    # minutes so that the kernel's millisecond timeouts hold them exactly.
    if choice == 0:
        return None
    if choice == 1:
        return now.replace(second=0, microsecond=0) - timedelta(days=1)
    return now.replace(second=0, microsecond=0) + timedelta(days=choice - 1, minutes=choice * 7)


def _allow(network: Network, expires: datetime | None, index: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"cidr": str(network), "owner": "prop", "reason": f"entry {index}",
                             "review_by": "2099-01-01"}
    if expires is not None:
        entry["expires"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return entry


@st.composite
def policies(draw: st.DrawFn, *, now: datetime | None = None, lab_safe: bool = False,
             min_entries: int = 0, max_entries: int = 12) -> GeneratedPolicy:
    """Random policies: both families, overlaps, adjacency, duplicates, expiring entries,
    entries of one service spread over two files and a file: list."""
    now = now or datetime.now(UTC)
    definitions: dict[str, tuple[tuple[tuple[int, int], ...], tuple[str, ...]]] = dict(BUILTIN)
    custom: dict[str, Any] = {}
    if draw(st.booleans()):
        ports = draw(st.sampled_from([((9100, 9100),), ((9200, 9300),), ((9100, 9100), (9200, 9300))]))
        protocols = draw(st.sampled_from([("tcp",), ("udp",), ("tcp", "udp")]))
        definitions["metrics"] = (ports, protocols)
        custom = {"ports": [a if a == b else f"{a}-{b}" for a, b in ports], "protocols": list(protocols)}
    documents: dict[str, dict[str, Any]] = {"a.yaml": {"services": {}}, "b.yaml": {"services": {}}}
    if custom:
        documents["a.yaml"]["services"]["metrics"] = dict(custom, allow=[])
    entries: dict[str, list[RefEntry]] = {name: [] for name in definitions}
    pool: list[Network] = []
    lists: dict[str, str] = {}
    count = draw(st.integers(min_entries, max_entries))
    for index in range(count):
        service = draw(st.sampled_from(sorted(definitions)))
        if pool and draw(st.integers(0, 4)) == 0:
            network = draw(st.sampled_from(pool))  # a duplicate, possibly with another expiry
        else:
            network = draw(networks(lab_safe=lab_safe))
            pool.append(network)
        expires = _expiry(now, draw(st.integers(0, 4)))
        entries[service].append(RefEntry(network, expires))
        target = documents[draw(st.sampled_from(["a.yaml", "b.yaml"]))]["services"]
        target.setdefault(service, {}).setdefault("allow", []).append(_allow(network, expires, index))
    if draw(st.booleans()):
        service = draw(st.sampled_from(sorted(definitions)))
        members = draw(st.lists(networks(lab_safe=lab_safe), min_size=1, max_size=8))
        expires = _expiry(now, draw(st.integers(0, 4)))
        newline = draw(st.sampled_from(["\n", "\r\n"]))
        lines = ["# published ranges", *[f"{m}  # member {i}" if i % 2 else str(m) for i, m in enumerate(members)], ""]
        lists["ranges.txt"] = newline.join(lines)
        entries[service].extend(RefEntry(m, expires) for m in members)
        allow: dict[str, Any] = {"file": "ranges.txt", "owner": "prop", "reason": "list", "review_by": "2099-01-01"}
        if expires is not None:
            allow["expires"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        documents["b.yaml"]["services"].setdefault(service, {}).setdefault("allow", []).append(allow)
    # Options that change how the kernel holds the sets, never what they allow.
    for service in draw(st.lists(st.sampled_from(sorted(definitions)), max_size=2, unique=True)):
        documents["a.yaml"]["services"].setdefault(service, {})["entry_counters"] = True
    if draw(st.booleans()):
        documents["a.yaml"]["settings"] = {"strict_source": True}
    files = {name: yaml.safe_dump(doc, sort_keys=False) for name, doc in documents.items()
             if doc["services"] or doc.get("settings")}
    if not files:
        files["a.yaml"] = "services: {}\n"
    reference = Reference(tuple(
        RefService(name, ports, protocols, tuple(entries[name]))
        for name, (ports, protocols) in sorted(definitions.items())
    ))
    return GeneratedPolicy(files, reference, now, lists)
