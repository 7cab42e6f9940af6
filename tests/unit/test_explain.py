"""check --why: the reasoning behind an answer, from the policy alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import invoke
from unit_support import WriteFiles

from hostwall.check import explain
from hostwall.compile import compile_policy
from hostwall.policy import load_policy

META = "        owner: {owner}\n        reason: {reason}\n        review_by: 2099-01-01\n"
POLICY = (
    "services:\n  https:\n    allow:\n"
    "      - cidr: 203.0.113.45/32\n" + META.format(owner="partner-b", reason="inventory sync")
    + "      - cidr: 203.0.113.46/31\n" + META.format(owner="partner-b", reason="second host")
    + "      - cidr: 203.0.114.0/24\n" + META.format(owner="partner-d", reason="d's range")
    + "      - cidr: 198.51.100.7/32\n" + META.format(owner="partner-b", reason="b elsewhere")
    + "      - cidr: 192.0.2.0/24\n" + META.format(owner="other", reason="far away")
    + "  postgres:\n    allow:\n"
    "      - cidr: 203.0.113.0/24\n" + META.format(owner="platform", reason="db clients")
)


@pytest.fixture
def root(write_files: WriteFiles) -> Path:
    return write_files({"policy.yaml": POLICY})


def test_allowed_names_the_entry_and_the_merged_kernel_element(root: Path) -> None:
    policy = load_policy(root)
    why = explain(policy, compile_policy(policy), "203.0.113.46", "443/udp")

    assert why.decision.allowed
    assert why.steps[0] == ("443/udp belongs to service https (ports 443/tcp+udp, defined built-in, action drop)")
    assert why.steps[1] == (f"203.0.113.46 is inside 203.0.113.46/31, {root / 'policy.yaml'}:8, owner partner-b: "
                            "second host (review by 2099-01-01)")
    # .45/32 and .46/31 touch, so the kernel holds them as one element.
    assert str(why.merged) == "203.0.113.45-203.0.113.47"
    assert why.merged_entries == 2
    assert "merged from 2 entries" in why.steps[2]
    assert why.steps[-1] == "so the chain svc_https accepts it"
    assert why.neighbours == ()


def test_denied_shows_the_nearest_entries_of_the_same_16_and_owner(root: Path) -> None:
    policy = load_policy(root)
    why = explain(policy, compile_policy(policy), "203.0.113.50", "443")

    assert not why.decision.allowed
    assert why.steps[-1] == "so the packet meets the chain's final drop"
    shown = [(n.service, str(n.entry.network), n.why) for n in why.neighbours]
    assert shown == [
        ("postgres", "203.0.113.0/24", "allows it for service postgres"),
        ("https", "203.0.113.46/31", "same /16"),
        ("https", "203.0.113.45/32", "same /16"),
        ("https", "203.0.114.0/24", "same /16"),
        ("https", "198.51.100.7/32", "same owner (partner-b) as an entry above"),
    ]


def test_denied_with_nothing_near(root: Path) -> None:
    policy = load_policy(root)
    why = explain(policy, compile_policy(policy), "10.9.9.9", "443")

    assert why.neighbours == ()


def test_unprotected_port_says_so(root: Path) -> None:
    policy = load_policy(root)
    why = explain(policy, compile_policy(policy), "10.9.9.9", "8080/tcp")

    assert why.decision.allowed
    assert why.steps == ("8080/tcp belongs to no service (protected: https 443/tcp+udp, postgres 5432/tcp); "
                         "hostwall lets it pass",)


def test_command_why_text(root: Path) -> None:
    result = invoke(root, "check", "--no-kernel", "203.0.113.50", "443", "--why")

    assert result.exit_code == 10
    lines = result.stdout.splitlines()
    assert lines[0] == "denied: no allow entry of service https covers 203.0.113.50"
    assert lines[1] == "why:"
    assert lines[2].startswith("  1. 443/tcp belongs to service https")
    assert "nearest entries (might have been meant):" in lines
    assert any(line.split()[:3] == ["https", "203.0.113.46/31", "partner-b"] for line in lines)


def test_command_why_json(root: Path) -> None:
    result = invoke(root, "check", "--no-kernel", "203.0.113.45", "443", "--why", "--json")

    assert result.exit_code == 0
    why = json.loads(result.stdout)["why"]
    assert why["merged"] == "203.0.113.45-203.0.113.47"
    assert why["merged_entries"] == 2
    assert why["nearest"] == []
    assert why["steps"][1].startswith("203.0.113.45 is inside 203.0.113.45/32")
