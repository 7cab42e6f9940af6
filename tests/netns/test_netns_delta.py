"""Element deltas over nf_tables netlink, checked against the real kernel.

Small element-only changes skip libnftables and go out as a hand-built batch of
NEWSETELEM/DELSETELEM messages; interval encoding (end elements, ranges that reach
the family's last address, IPv6) is where such code goes wrong, so each change is
checked by re-reading every element (plan) and by real connections.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from netns_support import Nft, PolicyWriter, matrix, reach

from hostwall.compile import compile_policy
from hostwall.engine import Engine
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.state import StateDir

pytestmark = pytest.mark.root

EDGES = ["255.255.255.0/24", "ffff::/16", "10.77.5.2/31", "10.77.5.4/32", "fd00:77:9::/48",
         "0.0.0.0/8"]


def test_element_deltas_reach_the_kernel_exactly(
    lab: Lab, backend: NftBackend, state_dir: Path, policy_dir: Path, write_policy: PolicyWriter
) -> None:
    engine = Engine(backend, StateDir(state_dir))
    ok, bad = lab.allowed, lab.denied

    def apply(services: dict[str, list[str]]) -> str | None:
        write_policy(services)
        policy = load_policy(policy_dir)
        result = engine.apply(policy, user="netns-tests", message="delta")
        assert result.applied
        # plan() reads every element back from the kernel and compares it with the record.
        assert engine.plan(compile_policy(policy)).changed is False
        status = engine.status()
        assert (status.drift.reasons, status.generation) == ((), result.generation)
        return result.method

    assert apply({"https": [f"{ok.ipv4}/32", f"{ok.ipv6}/128"], "postgres": [f"{ok.ipv4}/32"]}) == "full"

    swapped = {"https": [f"{bad.ipv4}/32", f"{bad.ipv6}/128", *EDGES], "postgres": [f"{bad.ipv4}/32"]}
    assert apply(swapped) == "delta"
    expected = {
        **matrix({"allowed": "timeout", "denied": "open"}, (4, 6), ("443/tcp", "443/udp")),
        **matrix({"allowed": "timeout", "denied": "open"}, (4,), ("5432/tcp",)),
    }
    assert reach(lab, expected) == expected

    # Remove the edge cases again, and give the allowed client back its IPv6 address.
    assert apply({"https": [f"{bad.ipv4}/32", f"{ok.ipv6}/128"], "postgres": []}) == "delta"
    expected = {
        ("allowed", 6, "443/tcp"): "open", ("allowed", 4, "443/tcp"): "timeout",
        ("denied", 4, "443/tcp"): "open", ("denied", 6, "443/tcp"): "timeout",
        ("denied", 4, "5432/tcp"): "timeout",
    }
    assert reach(lab, expected) == expected


def test_a_tampered_generation_marker_forces_a_full_load(
    lab: Lab, backend: NftBackend, nft: Nft, state_dir: Path, policy_dir: Path,
    write_policy: PolicyWriter,
) -> None:
    engine = Engine(backend, StateDir(state_dir))
    write_policy({"https": [f"{lab.allowed.ipv4}/32"]})
    assert engine.apply(load_policy(policy_dir), user="netns-tests", message="one").method == "full"

    # Someone rewrites the marker: the record no longer describes the kernel.
    nft("delete", "element", "inet", "hostwall", "generation", "{ 1 }")
    nft("add", "element", "inet", "hostwall", "generation", "{ 77 }")
    assert engine.status().drift, "a foreign generation marker is not reported as drift"

    write_policy({"https": [f"{lab.denied.ipv4}/32"]})
    result = engine.apply(load_policy(policy_dir), user="netns-tests", message="two")
    assert (result.applied, result.method) == (True, "full")
    assert engine.status().drift.reasons == ()
    expected = {("allowed", 4, "443/tcp"): "timeout", ("denied", 4, "443/tcp"): "open"}
    assert reach(lab, expected) == expected
