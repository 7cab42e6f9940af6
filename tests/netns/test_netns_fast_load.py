"""The full load built as netlink messages (hostwall.nftload) against libnftables.

Three things are checked against the real kernel and the real nft, in a namespace of
the test's own: the batch is, byte for byte, the one `nft -f` sends for the rendered
text (clearing commands included); loading either way leaves the same `nft list
table`; and a batch the kernel refuses leaves the ruleset exactly as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from mnl_dump import batch
from msgspec.structs import replace
from netns_support import COMMAND_TIMEOUT, RejectingBackend, run_nft
from reference import GeneratedPolicy, examples, policies

from hostwall.cidr import Interval
from hostwall.compile import compile_policy
from hostwall.errors import KernelRejected, StateError
from hostwall.nft import NftBackend
from hostwall.nftload import encodable, full_load_messages
from hostwall.nftnl import NetlinkTable
from hostwall.policy import load_policy
from hostwall.policyspec import PortRange
from hostwall.ruleset import Ruleset, ServiceRules, TableObjects, render_clearing, render_full_load

pytestmark = pytest.mark.root

# The time left of an expiring element moves on between two listings.
_EXPIRES = re.compile(r" expires [0-9dhms]+")
V4_MAX, V6_MAX = (1 << 32) - 1, (1 << 128) - 1


@pytest.fixture
def namespace(privileges: None) -> Iterator[str]:
    name = f"hw{os.getpid()}xfast"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=COMMAND_TIMEOUT)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True, timeout=COMMAND_TIMEOUT)


@pytest.fixture
def fast(namespace: str) -> Iterator[NftBackend]:
    backend = NftBackend(namespace)
    yield backend
    backend.close()


def listing(namespace: str) -> str:
    return _EXPIRES.sub("", run_nft(namespace, "list", "table", "inet", "hostwall").stdout)


def table_objects(namespace: str) -> TableObjects:
    table = NetlinkTable(namespace)
    try:
        snapshot = table.snapshot()
    finally:
        table.close()
    return snapshot.objects if snapshot is not None else TableObjects()


def nft_batch(namespace: str, text: str, tmp_path: Path) -> list[tuple[int, bytes]]:
    """Load text with nft -f in the namespace; the nf_tables messages nft sent for it."""
    path = tmp_path / "load.nft"
    path.write_text(text)
    result = run_nft(namespace, "--debug=mnl", "-f", str(path))
    return batch(result.stdout + result.stderr)


def hand_made(now: float, *, strict_source: bool) -> Ruleset:
    """Every shape the encoder has: a range starting at address zero and ranges reaching
    the last address (no end element), single addresses and ranges with and without
    timeouts, port ranges, both protocols, reject and drop, IPv6 below ::1:0:0:0, drop
    logging at the ruleset's rate, at a service's own and switched off."""
    v4 = [Interval(4, 0, 0x00FFFFFF), Interval(4, 0x0A000000, 0x0AFFFFFF),
          Interval(4, 0xC0000201, 0xC0000201, now + 3600), Interval(4, 0xC0000207, 0xC0000207),
          Interval(4, 0xC6336400, 0xC6336409, now + 100),
          Interval(4, 0xF0000000, V4_MAX)]
    v6 = [Interval(6, 5, 5), Interval(6, 0x20010DB8 << 96, (0x20010DB8 << 96) | ((1 << 96) - 1), now + 7200),
          Interval(6, 0xFFFF << 112, V6_MAX, now + 60)]
    return Ruleset((
        ServiceRules("https", (PortRange(443, 443), PortRange(8000, 8010)), ("tcp", "udp"), "reject", v4, v6),
        ServiceRules("postgres", (PortRange(5432, 5432),), ("tcp",), "drop", (), [Interval(6, 1, 1)], log=25),
        ServiceRules("empty", (PortRange(9100, 9100),), ("udp",), "drop", log="off"),
    ), log_group=7, log_rate=3, log_burst=9, strict_source=strict_source)


@pytest.mark.parametrize("strict_source", [False, True])
def test_the_batch_is_the_one_nft_sends_for_the_rendered_text(namespace: str, tmp_path: Path,
                                                             strict_source: bool) -> None:
    now = time.time()
    earlier = hand_made(now, strict_source=not strict_source)
    for generation, ruleset in ((1, earlier), (2, hand_made(now, strict_source=strict_source))):
        existing = table_objects(namespace)  # nothing the first time, then what load 1 left
        sent = nft_batch(namespace, render_clearing(existing) + render_full_load(ruleset, generation, now), tmp_path)
        built = [(m.kind, m.payload) for m in full_load_messages(ruleset, generation, now, existing)]
        assert [kind for kind, _ in built] == [kind for kind, _ in sent]
        differing = [(index, kind) for index, ((kind, ours), (_, theirs)) in enumerate(zip(built, sent, strict=True))
                     if ours != theirs]
        assert differing == []


def test_a_load_replaces_the_contents_in_place_and_lists_as_libnftables_loads(
    namespace: str, fast: NftBackend
) -> None:
    now = time.time()
    ruleset = hand_made(now, strict_source=False)
    fast.submit(render_full_load(ruleset, 1, now))
    by_text = listing(namespace)
    handles = run_nft(namespace, "-a", "list", "chain", "inet", "hostwall", "ingress").stdout.splitlines()[:2]

    fast.load(ruleset, 1, now)

    assert listing(namespace) == by_text
    # The table and its base chain stay (README, "No window during reloads").
    assert run_nft(namespace, "-a", "list", "chain", "inet", "hostwall", "ingress").stdout.splitlines()[:2] == handles


def test_a_refused_load_leaves_the_ruleset_byte_identical(namespace: str, fast: NftBackend) -> None:
    now = time.time()
    fast.load(hand_made(now, strict_source=False), 1, now)
    # With handles, so that a re-created object shows; without the time left of expiring
    # elements, which moves on.
    before = _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout)
    rejecting = RejectingBackend(namespace)
    try:
        with pytest.raises(KernelRejected, match="the kernel rejected the transaction"):
            rejecting.load(hand_made(now, strict_source=True), 2, now)
    finally:
        rejecting.close()
    assert _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout) == before


def test_fast_path_and_libnftables_list_the_same_table_for_random_policies(
    namespace: str, fast: NftBackend, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    shapes: set[tuple[bool, bool]] = set()

    @examples(30)
    @given(generated=policies())
    def check(generated: GeneratedPolicy) -> None:
        generated.write(policy_dir)
        ruleset = compile_policy(load_policy(policy_dir))
        now = time.time()
        fast.submit(render_full_load(ruleset, 5, now))
        by_text = listing(namespace)
        fast.load(ruleset, 5, now)
        assert listing(namespace) == by_text
        if encodable(ruleset):
            # And the other way round: libnftables replacing what the netlink load left.
            fast.submit(render_full_load(ruleset, 5, now))
            assert listing(namespace) == by_text
        timeouts = any(s.has_timeouts(f) for s in ruleset.services for f in (4, 6))
        shapes.add((encodable(ruleset), timeouts))

    check()
    # The examples covered the netlink path, with and without expiring entries.
    assert {(True, True), (True, False)} <= shapes, shapes


def counted(ruleset: Ruleset) -> Ruleset:
    """The same ruleset with per-element counters, which only libnftables loads."""
    return replace(ruleset, services=tuple(replace(service, entry_counters=True) for service in ruleset.services))


@pytest.mark.parametrize("path", ["netlink", "libnftables"])
def test_before_commit_runs_while_the_kernel_still_holds_the_previous_load(
    namespace: str, fast: NftBackend, path: str
) -> None:
    now = time.time()
    variant = counted if path == "libnftables" else (lambda ruleset: ruleset)
    first, second = variant(hand_made(now, strict_source=False)), variant(hand_made(now, strict_source=True))
    assert encodable(second) is (path == "netlink")
    fast.load(first, 1, now)
    loaded_first = _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout)
    seen: list[str] = []

    fast.load(second, 2, now, before_commit=lambda: seen.append(
        _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout)))

    assert seen == [loaded_first]
    loaded_second = _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout)
    assert "generation=2 " in loaded_second

    def refuse() -> None:
        raise StateError("cannot record generation 3: disk full")

    with pytest.raises(StateError, match="disk full"):
        fast.load(first, 3, now, before_commit=refuse)
    assert _EXPIRES.sub("", run_nft(namespace, "-a", "list", "ruleset").stdout) == loaded_second
