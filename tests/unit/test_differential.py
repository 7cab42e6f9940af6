"""The compiled ruleset allows exactly what an independent reference matcher allows.

Random policies (tests/reference.py) are loaded and compiled by hostwall; their sets
are compared with the reference at every boundary of every entry and every compiled
interval, which decides equality over the whole address space, expiry included.
The same comparison against the kernel's sets is in tests/netns/test_differential_kernel.py.
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st
from reference import GeneratedPolicy, examples, mismatches, networks, policies

from hostwall.check import check_policy
from hostwall.compile import compile_policy
from hostwall.policy import load_policy
from hostwall.ruleset import render_full_load


def _policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy"
    directory.mkdir(exist_ok=True)
    return directory


@examples(150)
@given(generated=policies())
def test_compiled_sets_allow_exactly_what_the_reference_allows(tmp_path: Path, generated: GeneratedPolicy) -> None:
    directory = _policy_dir(tmp_path)
    generated.write(directory)
    ruleset = compile_policy(load_policy(directory, now=generated.now))
    assert [s.name for s in ruleset.services] == [s.name for s in generated.reference.services]
    problems = []
    for expected in generated.reference.services:
        compiled = ruleset.service(expected.name)
        assert compiled is not None
        assert [(p.first, p.last) for p in compiled.ports] == list(expected.ports)
        assert tuple(compiled.protocols) == expected.protocols
        for family in (4, 6):
            actual = [(i.first, i.last, i.expires) for i in compiled.intervals(family)]
            problems += mismatches(generated.reference, expected, family, actual, generated.now)
    assert problems == []


@examples(100)
@given(generated=policies(), data=st.data())
def test_check_agrees_with_the_reference(tmp_path: Path, generated: GeneratedPolicy, data: st.DataObject) -> None:
    directory = _policy_dir(tmp_path)
    generated.write(directory)
    policy = load_policy(directory, now=generated.now)
    candidates = [a for s in generated.reference.services for e in s.entries
                  for a in (e.network.network_address, e.network.broadcast_address,
                            e.network.broadcast_address + 1 if int(e.network.broadcast_address) < (
                                (1 << e.network.max_prefixlen) - 1) else e.network.network_address)]
    for _ in range(10):
        if candidates and data.draw(st.booleans()):
            address = data.draw(st.sampled_from(candidates))
        else:
            address = data.draw(networks()).network_address
        port = data.draw(st.sampled_from([443, 5432, 9100, 9250, 9300, 9301, 8080]))
        protocol = data.draw(st.sampled_from(["tcp", "udp"]))
        decision = check_policy(policy, str(address), f"{port}/{protocol}")
        assert decision.allowed == generated.reference.allows(str(address), port, protocol, generated.now), (
            address, port, protocol, decision)


@examples(60)
@given(generated=policies(), seed=st.randoms(use_true_random=False))
def test_compile_is_deterministic_whatever_the_order_of_entries(
    tmp_path: Path, generated: GeneratedPolicy, seed: random.Random
) -> None:
    directory = _policy_dir(tmp_path)
    generated.write(directory)
    first = compile_policy(load_policy(directory, now=generated.now))
    again = compile_policy(load_policy(directory, now=generated.now))
    assert again == first and again.digest == first.digest
    now = generated.now.timestamp()
    assert render_full_load(again, 3, now) == render_full_load(first, 3, now)

    # The same entries in another order, moved between files, are the same ruleset.
    for name, text in generated.files.items():
        document = yaml.safe_load(text)
        for service in (document.get("services") or {}).values():
            seed.shuffle(service.get("allow", []))
        (directory / name).write_text(yaml.safe_dump(document, sort_keys=False))
    shuffled = compile_policy(load_policy(directory, now=generated.now))
    assert shuffled.digest == first.digest


def test_reference_matcher_sanity() -> None:
    """The reference itself, on hand-checked cases, so a bug there cannot hide one in hostwall."""
    from datetime import UTC, datetime

    from reference import RefEntry, Reference, RefService

    now = datetime(2026, 1, 1, tzinfo=UTC)
    https = RefService("https", ((443, 443),), ("tcp", "udp"),
                       (RefEntry(ipaddress.ip_network("192.0.2.0/31")),
                        RefEntry(ipaddress.ip_network("2001:db8::/127"), datetime(2025, 1, 1, tzinfo=UTC))))
    reference = Reference((https,))
    assert reference.allows("192.0.2.1", 443, "udp", now)
    assert not reference.allows("192.0.2.2", 443, "tcp", now)
    assert not reference.allows("2001:db8::1", 443, "tcp", now)  # expired
    assert reference.allows("192.0.2.2", 5432, "tcp", now)  # not protected by this reference
    assert reference.allows("::1", 443, "tcp", now)
    assert mismatches(reference, https, 4, [(int(ipaddress.IPv4Address("192.0.2.0")),
                                             int(ipaddress.IPv4Address("192.0.2.1")), float("inf"))], now) == []
    assert mismatches(reference, https, 4, [], now) != []
