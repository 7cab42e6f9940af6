"""Atomic transactions against the real kernel: other tables survive, a refused batch
changes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from netns_support import (
    KERNEL_ENFILE,
    KERNEL_ONLY_FAILURE,
    CliJson,
    Nft,
    PolicyWriter,
    matrix,
    reach,
)

from hostwall.engine import Engine
from hostwall.errors import KernelRejected
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.state import StateDir

pytestmark = pytest.mark.root

OTHER_TOOLS = """\
table ip othertool {
	set s {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}
	chain input {
		type filter hook input priority 0; policy accept;
		tcp dport 22 counter accept
	}
}
table inet filter {
	chain forward {
		type filter hook forward priority 0; policy drop;
		ct state established,related accept
	}
	chain output {
		type filter hook output priority 0; policy accept;
		meta l4proto udp udp dport 53 counter
	}
}
"""
OTHER_TABLES = (("ip", "othertool"), ("inet", "filter"))


def other_tables(nft: Nft) -> dict[str, str]:
    return {f"{family} {name}": nft("-j", "list", "table", family, name).stdout
            for family, name in OTHER_TABLES}


def hostwall_listing(nft: Nft) -> str:
    return nft("-j", "list", "table", "inet", "hostwall").stdout


def generation_dirs(state_dir: Path) -> list[str]:
    return sorted(os.listdir(state_dir / "generations"))


def test_the_injected_failure_is_refused_by_the_kernel_not_the_parser(lab: Lab, nft: Nft) -> None:
    """Calibrates the rejection used below: same syntax loads with one element, fails with two."""
    nft("add", "table", "inet", "hostwall")
    one_element = KERNEL_ONLY_FAILURE.replace(", 192.0.2.2", "")
    nft("-f", "-", stdin=one_element)

    nft("delete", "table", "inet", "hostwall")
    nft("add", "table", "inet", "hostwall")
    refused = nft("-f", "-", stdin=KERNEL_ONLY_FAILURE, check=False)
    assert refused.returncode == 1
    # "Could not process rule: <strerror>" is how nft reports an error the kernel sent
    # back over netlink; ENFILE comes from nf_tables' element insertion, not from nft.
    assert f"Could not process rule: {KERNEL_ENFILE}" in refused.stderr, refused.stderr
    assert "syntax error" not in refused.stderr
    nft("delete", "table", "inet", "hostwall")


def test_other_tables_are_byte_identical_after_every_kind_of_apply(
    lab: Lab, nft: Nft, write_policy: PolicyWriter, cli_json: CliJson, rejecting_engine: Engine,
    policy_dir: Path,
) -> None:
    nft("-f", "-", stdin=OTHER_TOOLS)
    before = other_tables(nft)
    assert all('"nftables"' in listing for listing in before.values())

    write_policy({"https": [f"{lab.allowed.ipv4}/32"], "postgres": []})
    code, document = cli_json("apply")
    assert (code, document["applied"]) == (0, True), document
    assert other_tables(nft) == before, "first apply changed another tool's table"

    write_policy({"https": [f"{lab.allowed.ipv4}/32", f"{lab.allowed.ipv6}/128"],
                  "postgres": [f"{lab.allowed.ipv4}/32"]})
    code, document = cli_json("apply")
    assert (code, document["applied"], document["generation"]) == (0, True, 2), document
    assert other_tables(nft) == before, "second apply changed another tool's table"

    write_policy({"https": ["10.77.1.2/24"]})  # host bits set: refused before the kernel
    code, document = cli_json("apply")
    assert (code, document["kind"]) == (3, "PolicyError"), document
    assert other_tables(nft) == before, "an invalid policy changed another tool's table"

    # A structural change (the action), so that it takes the full-load transaction.
    write_policy({"https": [f"{lab.denied.ipv4}/32"]}, action={"https": "reject"})
    with pytest.raises(KernelRejected):
        rejecting_engine.apply(load_policy(policy_dir), user="netns-tests", message="refused")
    assert other_tables(nft) == before, "a refused transaction changed another tool's table"

    # hostwall's own table sits beside them and still holds generation 2.
    code, status = cli_json("status")
    assert (code, status["generation"], status["drift"]) == (0, 2, []), status


def test_a_transaction_the_kernel_refuses_leaves_everything_as_it_was(
    lab: Lab, nft: Nft, write_policy: PolicyWriter, cli_json: CliJson, rejecting_engine: Engine,
    backend: NftBackend, policy_dir: Path, state_dir: Path,
) -> None:
    write_policy({"https": [f"{lab.allowed.ipv4}/32", f"{lab.allowed.ipv6}/128"],
                  "postgres": [f"{lab.allowed.ipv4}/32"]})
    code, document = cli_json("apply")
    assert (code, document["generation"]) == (0, 1), document
    listing = hostwall_listing(nft)
    current = (state_dir / "current.json").read_bytes()
    generations = generation_dirs(state_dir)
    assert generations == ["00000001"]

    # The new policy would swap the clients and turn postgres into reject; the action
    # change makes it a full load, the transaction the injected command rides on.
    write_policy({"https": [f"{lab.denied.ipv4}/32"], "postgres": [f"{lab.denied.ipv4}/32"]},
                 action={"postgres": "reject"})
    with pytest.raises(KernelRejected) as refused:
        rejecting_engine.apply(load_policy(policy_dir), user="netns-tests", message="refused")
    assert KERNEL_ENFILE in str(refused.value)

    assert hostwall_listing(nft) == listing
    assert (state_dir / "current.json").read_bytes() == current
    assert generation_dirs(state_dir) == generations
    assert json.loads(current)["generation"] == 1
    code, status = cli_json("status")
    assert (code, status["generation"], status["drift"]) == (0, 1, []), status

    expected = {
        **matrix({"allowed": "open", "denied": "timeout"}, (4,), ("443/tcp", "443/udp", "5432/tcp")),
        **matrix({"allowed": "open", "denied": "timeout"}, (6,), ("443/tcp",)),
    }
    assert reach(lab, expected) == expected

    # Control: the same backend class without the injected command loads the same policy
    # into the lab's namespace, so the refusal above happened there and nothing is stuck.
    engine = Engine(backend, StateDir(state_dir))
    result = engine.apply(load_policy(policy_dir), user="netns-tests", message="control")
    assert (result.applied, result.generation) == (True, 2)
    assert 'comment "hostwall generation=2 ' in nft("list", "table", "inet", "hostwall").stdout
    swapped = matrix({"allowed": "timeout", "denied": "open"}, (4,), ("443/tcp",))
    swapped[("allowed", 4, "5432/tcp")] = "refused"
    assert reach(lab, swapped) == swapped
