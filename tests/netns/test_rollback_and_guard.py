"""Rollback's choice and expiry, the element delta's in-batch guard and the in-place full
load, against the real kernel (each a mutation the rest of the suite let through: issue 24)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from netns_support import Cli, Nft, output

from hostwall.compile import compile_policy
from hostwall.engine import Engine
from hostwall.errors import KernelRejected
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.ruleset import Delta, element_delta
from hostwall.state import StateDir

pytestmark = pytest.mark.root


def _write(policy_dir: Path, entries: list[dict[str, Any]], bulk: list[str] | None = None) -> None:
    for old in policy_dir.iterdir():
        old.unlink()
    allow = [{"owner": "rollback-tests", "reason": "test", "review_by": "2099-01-01", **e} for e in entries]
    if bulk is not None:
        (policy_dir / "bulk.txt").write_text("\n".join(bulk) + "\n")
        allow.append({"file": "bulk.txt", "owner": "bulk", "reason": "generated", "review_by": "2099-01-01"})
    (policy_dir / "policy.yaml").write_text(json.dumps({"services": {"postgres": {"allow": allow}}}))


def _postgres_elements(nft: Nft) -> set[str]:
    document = json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout)
    found: set[str] = set()
    for item in document["nftables"]:
        listed = item.get("set")
        if listed and listed["name"] in ("postgres_v4", "postgres_v4_hosts"):
            for element in listed.get("elem", []):
                value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
                found.add(json.dumps(value, sort_keys=True))
    return found


def test_default_rollback_goes_to_the_generation_before_the_loaded_one(
    lab: Lab, policy_dir: Path, hostwall: Cli, nft: Nft, backend: NftBackend
) -> None:
    listings = []
    for cidr in ("192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32"):
        _write(policy_dir, [{"cidr": cidr}])
        assert hostwall("apply").returncode == 0
        listings.append(_postgres_elements(nft))
    assert len({json.dumps(sorted(listing)) for listing in listings}) == 3

    rolled = output(hostwall("rollback", "--json"))
    assert (rolled["generation"], rolled["previous"]) == (2, 3)
    loaded = backend.read_table(elements=False)
    assert loaded is not None and loaded.generation == 2  # the kernel's marker, not the record
    assert _postgres_elements(nft) == listings[1]

    rolled = output(hostwall("rollback", "--json"))
    assert (rolled["generation"], rolled["previous"]) == (1, 2)
    assert _postgres_elements(nft) == listings[0]


def _seconds_left(backend: NftBackend, cidr: str) -> float:
    table = backend.read_table(elements=True)
    assert table is not None and table.sets is not None
    (element,) = [i for name in ("postgres_v4",) for i in table.sets[name] if str(i) == cidr]
    return float(element.expires)


def test_rollback_of_an_expiring_generation_keeps_its_expiry(
    lab: Lab, policy_dir: Path, state_dir: Path, hostwall: Cli, backend: NftBackend
) -> None:
    """Generation 1 was made and loaded ten minutes ago (its engine's and state's clocks say
    so): the timeouts it was loaded with were the time left then. Rolled back now, the
    kernel must count down to the same absolute expiry, not restart a relative timeout
    of back then."""
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    loaded_earlier = 600.0
    _write(policy_dir, [{"cidr": "192.0.2.9/32", "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
                        {"cidr": "198.51.100.0/24"}])
    def earlier() -> float:
        return time.time() - loaded_earlier

    engine = Engine(backend, StateDir(state_dir, clock=earlier), clock=earlier)
    assert engine.apply(load_policy(policy_dir), user="t", message="contractor").generation == 1
    _write(policy_dir, [{"cidr": "198.51.100.0/24"}])
    assert hostwall("apply").returncode == 0

    rolled = output(hostwall("rollback", "--json"))
    assert (rolled["generation"], rolled["replayed"]) == (1, False)
    expected = expires.timestamp() - time.time()  # taken before the kernel is read: left <= this
    left = _seconds_left(backend, "192.0.2.9/32")
    # Rounded up to whole seconds, listed in whole seconds. Timeouts of back then would
    # leave about expected + loaded_earlier.
    assert expected - 120 <= left <= expected + 2, (left, expected)


class ConcurrentEdit(NftBackend):
    """The real backend, with another tool's change landing after hostwall's label check
    and before its delta batch reaches the kernel."""

    def __init__(self, netns: str, nft: Nft) -> None:
        super().__init__(netns)
        self._other_tool = nft
        self.interfered = 0

    def apply_delta(self, delta: Delta, now: float) -> None:
        if not self.interfered:
            self.interfered += 1
            self._other_tool("delete", "element", "inet", "hostwall", "generation", f"{{ {delta.from_generation} }}")
            self._other_tool("add", "element", "inet", "hostwall", "generation", "{ 4000000 }")
        super().apply_delta(delta, now)


def test_the_kernel_refuses_a_delta_when_the_marker_changed_after_the_label_check(
    lab: Lab, policy_dir: Path, state_dir: Path, nft: Nft
) -> None:
    bulk = [f"10.200.{n}.0/24" for n in range(40)]
    _write(policy_dir, [{"cidr": "192.0.2.1/32"}], bulk=bulk)
    backend = ConcurrentEdit(lab.server, nft)
    try:
        engine = Engine(backend, StateDir(state_dir))
        assert engine.apply(load_policy(policy_dir), user="t", message="base").method == "full"
        _write(policy_dir, [{"cidr": "192.0.2.1/32"}, {"cidr": "192.0.2.77/32"}], bulk=bulk)
        result = engine.apply(load_policy(policy_dir), user="t", message="one more")
        assert backend.interfered == 1, "the delta path was not taken: the guard was never asked"
        # The kernel refused the delta whole; the full load that followed replaced the stray marker.
        assert (result.applied, result.method, result.generation) == (True, "full", 2)
        markers = json.loads(nft("-j", "list", "set", "inet", "hostwall", "generation").stdout)
        (listed,) = [item["set"] for item in markers["nftables"] if "set" in item]
        assert listed.get("elem") == [2]
        assert not engine.status().drift
    finally:
        backend.close()


def test_the_kernel_refuses_a_delta_batch_over_another_marker(
    lab: Lab, policy_dir: Path, state_dir: Path, backend: NftBackend, nft: Nft
) -> None:
    """The guard itself: the batch sent while the kernel holds another marker is refused
    whole, and the table is left exactly as it was."""
    bulk = [f"10.200.{n}.0/24" for n in range(40)]
    _write(policy_dir, [{"cidr": "192.0.2.1/32"}], bulk=bulk)
    engine = Engine(backend, StateDir(state_dir))
    engine.apply(load_policy(policy_dir), user="t", message="base")
    nft("delete", "element", "inet", "hostwall", "generation", "{ 1 }")
    nft("add", "element", "inet", "hostwall", "generation", "{ 4000000 }")
    before = nft("list", "table", "inet", "hostwall").stdout
    _write(policy_dir, [{"cidr": "192.0.2.1/32"}, {"cidr": "192.0.2.77/32"}], bulk=bulk)
    state = StateDir(state_dir)
    recorded = state.generation(1).ruleset()
    delta = element_delta(recorded, compile_policy(load_policy(policy_dir)), 1, 2, time.time())
    assert delta.size() == 1
    with pytest.raises(KernelRejected):
        backend.apply_delta(delta, time.time())
    assert nft("list", "table", "inet", "hostwall").stdout == before


def _handles(nft: Nft) -> tuple[int, int]:
    document = json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout)
    (table,) = [item["table"] for item in document["nftables"] if "table" in item]
    (chain,) = [item["chain"] for item in document["nftables"]
                if "chain" in item and item["chain"]["name"] == "ingress"]
    return int(table["handle"]), int(chain["handle"])


def test_a_full_load_replaces_the_contents_in_place(
    lab: Lab, policy_dir: Path, hostwall: Cli, nft: Nft
) -> None:
    """The table and its base chain outlive every full load (render_clearing says why a
    re-created table lets packets through mid-commit): the kernel's handles stay."""
    _write(policy_dir, [{"cidr": "192.0.2.1/32"}])
    assert hostwall("apply").returncode == 0
    handles = _handles(nft)
    for ports in ([5432, 6432], [5432]):  # other ports: other rules, a full load each time
        document = json.loads((policy_dir / "policy.yaml").read_text())
        document["services"]["postgres"]["ports"] = ports
        (policy_dir / "policy.yaml").write_text(json.dumps(document))
        applied = output(hostwall("apply", "--json"))
        assert applied["method"] == "full", applied
        assert _handles(nft) == handles
    assert output(hostwall("rollback", "--to", "1", "--json"))["generation"] == 1
    assert _handles(nft) == handles
