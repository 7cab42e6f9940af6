"""The benchmarks' generated policies are what their figures claim: seeded, the sizes
asked for, non-overlapping (or overlapping by the share asked for), and valid policies.
No timing here: the figures come from `make bench`."""

from __future__ import annotations

import ipaddress
import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bench.bench_packet import one_interval_set
from bench.common import generate_entries, write_policy

from hostwall.compile import compile_policy
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def _sorted_networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return sorted((ipaddress.ip_network(c) for c in cidrs), key=lambda n: (n.version, int(n.network_address)))


def test_entries_are_seeded_sized_and_disjoint() -> None:
    entries = generate_entries(2000)
    assert entries == generate_entries(2000)
    assert entries != generate_entries(2000, seed=1)
    v4 = [e.cidr for e in entries if ":" not in e.cidr]
    v6 = [e.cidr for e in entries if ":" in e.cidr]
    assert (len(v4), len(v6)) == (2000, 500)
    assert {e.service for e in entries} == {"https", "postgres"}
    assert {ipaddress.ip_network(c).prefixlen for c in v4} >= {32, 24}
    networks = _sorted_networks(v4 + v6)
    for before, after in itertools.pairwise(networks):
        if before.version == after.version:
            # Neither overlapping nor adjacent, so the kernel holds exactly one element per entry.
            assert int(before.broadcast_address) + 1 < int(after.network_address)


@pytest.mark.parametrize("lists", [True, False])
def test_policies_load_and_compile_to_one_element_per_entry(tmp_path: Path, lists: bool) -> None:
    entries = generate_entries(400)
    write_policy(tmp_path, entries, lists=lists, extra={"https": ["10.99.1.2/32"]})
    ruleset = compile_policy(load_policy(tmp_path, NOW))
    assert ruleset.entry_count() == len(entries) + 1


def test_overlaps_are_merged_away(tmp_path: Path) -> None:
    entries = generate_entries(1000, overlap=0.1)
    assert len(entries) == 1250
    write_policy(tmp_path, entries, lists=True)
    count = compile_policy(load_policy(tmp_path, NOW)).entry_count()
    assert 0.9 * len(entries) - 1 <= count < len(entries)


def test_one_interval_set_is_the_earlier_layout_with_the_same_elements(tmp_path: Path) -> None:
    write_policy(tmp_path, generate_entries(200), lists=True, extra={"https": ["10.99.1.2/32"]})
    text = render_full_load(compile_policy(load_policy(tmp_path, NOW)), 1, NOW.timestamp())
    earlier = one_interval_set(text)
    assert "_hosts" not in earlier
    https_v4 = earlier.split("set https_v4 {", 1)[1].split("}", 1)[0]
    assert "10.99.1.2/32" in https_v4
    chain = earlier.split("chain svc_https {", 1)[1]
    assert chain.index("fib daddr type != local return") < chain.index("ip saddr @https_v4 ")

    def elements(rendered: str) -> set[str]:
        found = set()
        for block in rendered.split("elements = { ")[2:]:  # the first is the generation marker
            for item in block.split(" }", 1)[0].split(", "):
                found.add(item if "/" in item else f"{item}/{128 if ':' in item else 32}")
        return found

    assert elements(earlier) == elements(text)
