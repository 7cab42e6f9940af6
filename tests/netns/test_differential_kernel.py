"""What the kernel enforces equals what the policy says, for random policies.

Each random policy (tests/reference.py) is applied to the lab's server namespace in
turn, so consecutive examples exercise both element deltas and full loads. The sets
are read back with `nft -j list` and parsed here, independently of hostwall's own
listing code, then compared with the reference matcher at every boundary. A few
examples are also checked with real packets from addresses added to a client.
"""

from __future__ import annotations

import ipaddress
import json
import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netns_support import COMMAND_TIMEOUT, DENY_TIMEOUT, OPEN_TIMEOUT, Nft
from reference import GeneratedPolicy, Reference, examples, mismatches, policies

from hostwall.compile import compile_policy
from hostwall.engine import Engine
from hostwall.lab import Lab, probe_tcp
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load
from hostwall.state import StateDir

pytestmark = pytest.mark.root

# The kernel reports time left in whole seconds, and the examples take a while.
EXPIRY_TOLERANCE = 30.0
Sets = dict[str, list[tuple[int, int, float]]]


def _address(family: int, text: str) -> int:
    value = ipaddress.ip_address(text)
    assert value.version == family
    return int(value)


def _span(family: int, element: str | dict[str, Any]) -> tuple[int, int]:
    if isinstance(element, str):
        return _address(family, element), _address(family, element)
    if "prefix" in element:
        network = ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}")
        return int(network.network_address), int(network.broadcast_address)
    first, last = (_address(family, a) for a in element["range"])
    return first, last


def kernel_sets(nft: Nft) -> Sets:
    """Address sets of the hostwall table: name -> sorted (first, last, absolute expiry)."""
    return listed_sets(json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout), time.time())


def listed_sets(document: dict[str, Any], now: float) -> Sets:
    sets: Sets = {}
    for item in document["nftables"]:
        body = item.get("set")
        if body is None or body["type"] not in ("ipv4_addr", "ipv6_addr"):
            continue
        family = 4 if body["type"] == "ipv4_addr" else 6
        elements = []
        for item_element in body.get("elem", []):
            expiry, element = math.inf, item_element
            if isinstance(element, dict) and "elem" in element:  # with a timeout or a counter
                inner = element["elem"]
                if "timeout" in inner:
                    expiry = now + float(inner.get("expires", inner["timeout"]))
                element = inner["val"]
            elements.append((*_span(family, element), expiry))
        # The layout: single addresses in NAME_hosts (a hash set), wider ranges in NAME.
        name, hosts = body["name"].removesuffix("_hosts"), body["name"].endswith("_hosts")
        assert all((first == last) == hosts for first, last, _ in elements), f"{body['name']}: {elements}"
        sets[name] = sorted(sets.get(name, []) + elements)
    return sets


def listed_packets(document: dict[str, Any]) -> tuple[dict[str, dict[tuple[int, int], int]], dict[str, int]]:
    """Per set declared with a counter, the packets of each element by (first, last);
    and the packets of each named counter."""
    packets: dict[str, dict[tuple[int, int], int]] = {}
    counters = {}
    for item in document["nftables"]:
        if "counter" in item:
            counters[item["counter"]["name"]] = item["counter"]["packets"]
        body = item.get("set")
        if body is None or not any("counter" in statement for statement in body.get("stmt", [])):
            continue
        family = 4 if body["type"] == "ipv4_addr" else 6
        counted = packets.setdefault(body["name"].removesuffix("_hosts"), {})
        for element in body.get("elem", []):
            inner = element["elem"]
            counted[_span(family, inner["val"])] = inner["counter"]["packets"]
    return packets, counters


def read_back_matches_the_listing(backend: NftBackend, nft: Nft) -> None:
    """hostwall's own read of every element (netlink, decoded by nftelements: what an
    apply that changes nothing relies on) gives what nft's JSON listing gives."""
    now = time.time()
    document = json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout)
    table = backend.read_table(elements=True)
    assert table is not None and table.sets is not None and table.element_packets is not None
    ours: Sets = {name: sorted((i.first, i.last, i.expires if math.isinf(i.expires) else now + i.expires)
                               for i in intervals) for name, intervals in table.sets.items()}
    assert same_sets(ours, listed_sets(document, now)), (ours, listed_sets(document, now))
    packets, counters = listed_packets(document)
    assert table.element_packets == packets
    assert {name: counter.packets for name, counter in table.counters.items()} == counters


def disagreements(reference: Reference, sets: Sets, generated: GeneratedPolicy) -> list[str]:
    problems = []
    for service in reference.services:
        for family in (4, 6):
            actual = sets.get(f"{service.name}_v{family}")
            if actual is None:
                problems.append(f"no set {service.name}_v{family} in the kernel")
                continue
            problems += mismatches(reference, service, family, actual, generated.now, EXPIRY_TOLERANCE)
    return problems


def same_sets(a: Sets, b: Sets) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if [(f, l_, math.isinf(e)) for f, l_, e in a[name]] != [(f, l_, math.isinf(e)) for f, l_, e in b[name]]:
            return False
        if any(abs(x[2] - y[2]) > EXPIRY_TOLERANCE for x, y in zip(a[name], b[name], strict=True)
               if not math.isinf(x[2])):
            return False
    return True


def test_kernel_sets_allow_exactly_what_the_reference_allows(
    lab: Lab, backend: NftBackend, state_dir: Path, policy_dir: Path, nft: Nft
) -> None:
    """Also: apply is idempotent, and an element delta leaves what a full load leaves."""
    engine = Engine(backend, StateDir(state_dir))
    methods: list[str | None] = []

    @examples(30)
    @given(generated=policies())
    def check(generated: GeneratedPolicy) -> None:
        generated.write(policy_dir)
        policy = load_policy(policy_dir)
        result = engine.apply(policy, user="prop", message="differential")
        methods.append(result.method)
        sets = kernel_sets(nft)
        assert disagreements(generated.reference, sets, generated) == []
        read_back_matches_the_listing(backend, nft)

        again = engine.apply(load_policy(policy_dir), user="prop", message="again")
        assert not again.applied, again.plan.summary
        assert same_sets(kernel_sets(nft), sets)

        if result.method == "delta":
            assert result.generation is not None
            backend.submit(render_full_load(compile_policy(policy), result.generation, time.time()))
            assert same_sets(kernel_sets(nft), sets), "an element delta and a full load differ"
            engine.apply(policy, user="prop", message="records after the full load behind their back")

    check()
    # Random policies follow each other unrelated, so a delta among them is luck; one
    # small change on top of the last policy always takes the delta path.
    before = kernel_sets(nft)
    for extra in ("203.0.113.77/32", "198.51.100.77/32", "192.0.2.77/32"):
        (policy_dir / "zz-extra.yaml").write_text(
            f"services:\n  https:\n    allow:\n      - cidr: {extra}\n        owner: prop\n"
            "        reason: delta\n        review_by: 2099-01-01\n")
        policy = load_policy(policy_dir)
        result = engine.apply(policy, user="prop", message="one more entry")
        if result.applied:
            break
    assert result.method == "delta", result.plan.summary
    after = kernel_sets(nft)
    assert after != before
    assert result.generation is not None
    backend.submit(render_full_load(compile_policy(policy), result.generation, time.time()))
    assert same_sets(kernel_sets(nft), after), "an element delta and a full load differ"
    assert "full" in methods, methods


def _add_source(lab: Lab, address: str) -> None:
    v6 = ":" in address
    length = "128" if v6 else "32"
    extra = ["nodad"] if v6 else []
    subprocess.run(["ip", "-n", lab.allowed.namespace, "addr", "add", f"{address}/{length}", "dev", "eth0", *extra],
                   check=True, capture_output=True, timeout=COMMAND_TIMEOUT)
    subprocess.run(["ip", "-n", lab.server, "route", "add", f"{address}/{length}", "dev", "hwok"],
                   check=True, capture_output=True, timeout=COMMAND_TIMEOUT)


def _remove_source(lab: Lab, address: str) -> None:
    length = "128" if ":" in address else "32"
    for command in (["ip", "-n", lab.server, "route", "del", f"{address}/{length}", "dev", "hwok"],
                    ["ip", "-n", lab.allowed.namespace, "addr", "del", f"{address}/{length}", "dev", "eth0"]):
        subprocess.run(command, capture_output=True, timeout=COMMAND_TIMEOUT, check=False)


def _probe_from(lab: Lab, source: str, port: int, timeout: float) -> str:
    target = lab.allowed.server_ipv6 if ":" in source else lab.allowed.server_ipv4
    return probe_tcp(lab.allowed.namespace, target, port, timeout, source=source)


def _candidates(generated: GeneratedPolicy) -> list[str]:
    addresses = set()
    for service in generated.reference.services:
        for entry in service.entries:
            for value in (entry.network.network_address, entry.network.broadcast_address,
                          entry.network.broadcast_address + 1):
                # The first address of a /64 is a subnet-router anycast address; skip it.
                if value.version == 6 and int(value) & ((1 << 64) - 1) == 0:
                    continue
                addresses.add(str(value))
    return sorted(addresses)


def test_real_packets_follow_the_reference(lab: Lab, backend: NftBackend, state_dir: Path, policy_dir: Path) -> None:
    engine = Engine(backend, StateDir(state_dir))
    seen = {True: 0, False: 0}

    @examples(6)
    @given(generated=policies(lab_safe=True, min_entries=2, max_entries=8), data=st.data())
    def check(generated: GeneratedPolicy, data: st.DataObject) -> None:
        generated.write(policy_dir)
        engine.apply(load_policy(policy_dir), user="prop", message="packets")
        candidates = _candidates(generated)
        port = max((443, 5432), key=lambda p: sum(generated.reference.allows(c, p, "tcp", generated.now)
                                                  for c in candidates))
        allowed = [c for c in candidates if generated.reference.allows(c, port, "tcp", generated.now)]
        denied = [c for c in candidates if c not in allowed]
        # At least one of each when there is one, then a few more at random.
        sources = [data.draw(st.sampled_from(group)) for group in (allowed, denied) if group]
        sources += data.draw(st.lists(st.sampled_from(candidates), max_size=2))
        sources = sorted(set(sources))
        expected = {s: generated.reference.allows(s, port, "tcp", generated.now) for s in sources}
        for source in sources:
            _add_source(lab, source)
        try:
            with ThreadPoolExecutor(max_workers=len(sources)) as pool:
                futures = {s: pool.submit(_probe_from, lab, s, port, OPEN_TIMEOUT if expected[s] else DENY_TIMEOUT)
                           for s in sources}
                got = {s: future.result() for s, future in futures.items()}
        finally:
            for source in sources:
                _remove_source(lab, source)
        assert got == {s: "open" if allowed else "timeout" for s, allowed in expected.items()}
        for allowed in expected.values():
            seen[allowed] += 1

    check()
    assert seen[True] and seen[False], seen


def test_the_read_back_of_every_element_shape_matches_the_listing(
    lab: Lab, backend: NftBackend, state_dir: Path, policy_dir: Path, nft: Nft
) -> None:
    """The shapes the random policies may miss, in one policy: ranges that reach each
    family's last address (a start element and no end), ranges that start at the first
    address, ranges that touch, single addresses beside them, timeouts, element counters
    on one service and not the other; then the same after an element delta."""
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    entries = {
        "https": ["255.255.255.0/24", "0.0.0.0/8", "10.1.0.0/24", "10.1.1.0/24", "10.1.2.7/32",
                  "ffff::/16", "::/8", "2001:db8::1/128", "2001:db8:1::/48"],
        "postgres": ["128.0.0.0/1", "192.0.2.1/32", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"],
    }

    def write(extra: str = "") -> None:
        lines = ["services:\n"]
        for service, cidrs in entries.items():
            lines.append(f"  {service}:\n")
            if service == "https":
                lines.append("    entry_counters: true\n")
            lines.append("    allow:\n")
            for index, cidr in enumerate([*cidrs, *([extra] if extra and service == "https" else [])]):
                expiry = f"        expires: {soon}\n" if index % 3 == 0 else ""
                lines.append(f"      - cidr: {cidr}\n        owner: prop\n        reason: shapes\n"
                             f"        review_by: 2099-01-01\n{expiry}")
        (policy_dir / "shapes.yaml").write_text("".join(lines))

    engine = Engine(backend, StateDir(state_dir))
    write()
    assert engine.apply(load_policy(policy_dir), user="prop", message="shapes").method == "full"
    read_back_matches_the_listing(backend, nft)
    table = backend.read_table(elements=True)
    assert table is not None and table.sets is not None and table.element_packets is not None
    assert (0xFFFFFF00, 0xFFFFFFFF) in {(i.first, i.last) for i in table.sets["https_v4"]}
    assert (0xFFFF << 112, (1 << 128) - 1) in {(i.first, i.last) for i in table.sets["https_v6"]}
    assert any(not math.isinf(i.expires) for i in table.sets["https_v4"])
    assert set(table.element_packets) == {"https_v4", "https_v6"}

    write("203.0.113.9/32")
    result = engine.apply(load_policy(policy_dir), user="prop", message="one more")
    assert result.method == "delta", result.plan.summary
    read_back_matches_the_listing(backend, nft)
    again = engine.apply(load_policy(policy_dir), user="prop", message="again")
    assert not again.applied, again.plan.summary
