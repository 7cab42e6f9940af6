"""The CLI against a real kernel: idempotence, plan/status exit codes, drift, check,
and the shape of the table it loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from netns_support import COMMAND_TIMEOUT, Cli, CliJson, Nft, PolicyWriter, matrix, reach

from hostwall.lab import Lab

pytestmark = pytest.mark.root


def allow_the_allowed_client(lab: Lab) -> dict[str, list[str]]:
    ok = lab.allowed
    return {"https": [f"{ok.ipv4}/32", f"{ok.ipv6}/128"], "postgres": [f"{ok.ipv4}/32"]}


def test_plan_apply_and_status_are_idempotent(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson, state_dir: Path
) -> None:
    write_policy(allow_the_allowed_client(lab))
    code, status = cli_json("status")
    assert (code, status["loaded"]) == (10, False), status

    code, plan = cli_json("plan")
    assert (code, plan["changed"], plan["table_present"]) == (10, True, False), plan

    code, first = cli_json("apply")
    assert (code, first["changed"], first["applied"], first["generation"]) == (0, True, True, 1), first

    code, plan = cli_json("plan")
    assert (code, plan["changed"], plan["drift"]) == (0, False, []), plan

    code, second = cli_json("apply")
    assert (code, second["changed"], second["applied"]) == (0, False, False), second
    assert second["generation"] is None

    code, status = cli_json("status")
    assert code == 0, status
    assert (status["loaded"], status["generation"], status["recorded_generation"]) == (True, 1, 1)
    assert status["drift"] == []
    assert sorted(os.listdir(state_dir / "generations")) == ["00000001"]

    # A real change is planned again, and applied as the next generation.
    write_policy({**allow_the_allowed_client(lab), "postgres": []})
    code, plan = cli_json("plan")
    assert (code, plan["changed"]) == (10, True), plan
    assert [(s["name"], s["removed"]) for s in plan["services"]] == [("postgres", ["10.77.1.2/32"])]
    code, third = cli_json("apply")
    assert (code, third["applied"], third["generation"]) == (0, True, 2), third


def test_drift_is_reported_and_repaired(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson, hostwall: Cli, nft: Nft
) -> None:
    write_policy(allow_the_allowed_client(lab))
    code, document = cli_json("apply")
    assert code == 0, document

    # Appended after the chain's final drop, this rule changes no verdict: still drift.
    nft("add", "rule", "inet", "hostwall", "svc_https", "accept")
    code, status = cli_json("status")
    assert code == 10, status
    assert status["drift"], status
    assert status["generation"] == 1

    # Inserted at the head of the chain, it opens https to everyone.
    nft("insert", "rule", "inet", "hostwall", "svc_https", "accept")
    hole = {("denied", 4, "443/tcp"): "open"}
    assert reach(lab, hole) == hole
    code, status = cli_json("status")
    assert (code, bool(status["drift"])) == (10, True), status
    code, plan = cli_json("plan")
    assert (code, plan["changed"]) == (10, True), plan
    assert plan["drift"] == status["drift"]

    repair = hostwall("apply")
    assert repair.returncode == 0, repair.stderr
    assert "drift:" in repair.stdout
    assert re.search(r"^applied generation 2\b.*\(repaired drift\)$", repair.stdout, re.M), repair.stdout

    code, status = cli_json("status")
    assert (code, status["drift"], status["generation"]) == (0, [], 2), status
    closed = {("denied", 4, "443/tcp"): "timeout", ("allowed", 4, "443/tcp"): "open"}
    assert reach(lab, closed) == closed


def test_check_asks_the_kernel(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    code, document = cli_json("apply")
    assert code == 0, document

    def check(address: str, port: str) -> tuple[int, Any]:
        return cli_json("check", address, port, "--kernel")

    code, allowed = check(lab.allowed.ipv4, "443")
    assert code == 0, allowed
    assert (allowed["allowed"], allowed["kernel_allowed"], allowed["service"]) == (True, True, "https")
    assert [e["cidr"] for e in allowed["entries"]] == ["10.77.1.2/32"]

    for address, port in ((lab.denied.ipv4, "443"), (lab.denied.ipv6, "443/udp"),
                          (lab.allowed.ipv6, "5432")):
        code, denied = check(address, port)
        assert code == 10, denied
        assert (denied["allowed"], denied["kernel_allowed"]) == (False, False), (address, denied)

    code, unprotected = check(lab.denied.ipv4, "8080")
    assert (code, unprotected["allowed"], unprotected["service"]) == (0, True, None), unprotected

    # The policy file changes but is not applied: the kernel's answer is what counts.
    write_policy({"https": [], "postgres": []})
    code, stale = check(lab.allowed.ipv4, "443")
    assert code == 0, stale
    assert (stale["policy_allowed"], stale["kernel_allowed"], stale["allowed"]) == (False, True, True)


def _chains(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["chain"]["name"]: item["chain"] for item in listing["nftables"] if "chain" in item}


def test_the_loaded_table_has_the_designed_structure(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson, nft: Nft
) -> None:
    write_policy(allow_the_allowed_client(lab), action={"postgres": "reject"})
    code, document = cli_json("apply")
    assert code == 0, document

    tables = nft("list", "tables").stdout.splitlines()
    assert "table inet hostwall" in tables

    listing = json.loads(nft("-j", "list", "table", "inet", "hostwall").stdout)
    chains = _chains(listing)
    base = {name: chain for name, chain in chains.items() if "hook" in chain}
    assert list(base) == ["ingress"], "exactly one base chain"
    ingress = base["ingress"]
    assert (ingress["type"], ingress["hook"], ingress["prio"], ingress["policy"]) == (
        "filter", "prerouting", -300, "accept")
    assert sorted(chains) == ["ingress", "svc_https", "svc_postgres"]

    text = nft("list", "chain", "inet", "hostwall", "ingress").stdout
    assert "type filter hook prerouting priority raw; policy accept;" in text
    assert 'iif "lo" accept' in text
    assert "vmap" not in text, "dispatch is by rules (README: no window during reloads)"
    for dispatch in ("tcp dport 443 jump svc_https", "udp dport 443 jump svc_https",
                     "tcp dport 5432 jump svc_postgres"):
        assert dispatch in text

    sets = {item["set"]["name"]: item["set"] for item in listing["nftables"]
            if "set" in item and item["set"]["type"] in ("ipv4_addr", "ipv6_addr")}
    assert {name: (s["type"], s.get("flags")) for name, s in sets.items()} == {
        "https_v4": ("ipv4_addr", ["interval"]), "https_v6": ("ipv6_addr", ["interval"]),
        "postgres_v4": ("ipv4_addr", ["interval"]), "postgres_v6": ("ipv6_addr", ["interval"]),
        # Single addresses: hash sets, one lookup whatever their size.
        "https_v4_hosts": ("ipv4_addr", None), "https_v6_hosts": ("ipv6_addr", None),
        "postgres_v4_hosts": ("ipv4_addr", None), "postgres_v6_hosts": ("ipv6_addr", None),
    }
    # The label of the full load is the generation set's comment.
    status_code, status = cli_json("status")
    assert status_code == 0, status
    comment = f'comment "hostwall generation={status["generation"]} sha256='
    assert comment in nft("list", "table", "inet", "hostwall").stdout

    postgres = nft("list", "chain", "inet", "hostwall", "svc_postgres").stdout
    assert "fib daddr type != local return" in postgres
    assert "reject with tcp reset" in postgres
    https = nft("list", "chain", "inet", "hostwall", "svc_https").stdout
    assert "drop" in https and "reject" not in https

    # The root namespace never saw any of it.
    root = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True,
                          timeout=COMMAND_TIMEOUT)
    assert "table inet hostwall" not in root.stdout.splitlines()
    expected = matrix({"allowed": "open", "denied": "refused"}, (4,), ("5432/tcp",))
    assert reach(lab, expected) == expected
