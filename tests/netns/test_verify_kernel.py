"""hostwall verify against the real kernel: the lab server's ruleset copied into a
replica and probed there. A correct table agrees for random policies; a table broken
by hand is caught and the address named; nothing verify creates outlives it."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agent_doubles import RecordingSink as _Records
from agent_doubles import SilentNotifier as _Notes
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from netns_support import COMMAND_TIMEOUT, Cli, CliJson, Nft, PolicyWriter

from hostwall.agent import Agent
from hostwall.cli.common import Options
from hostwall.cli.journal import reload_verifier
from hostwall.drops import MESSAGE_ID_VERIFY
from hostwall.engine import Engine
from hostwall.lab import Lab
from hostwall.nft import NftBackend
from hostwall.policy import load_policy
from hostwall.state import StateDir
from hostwall.verify.replica import OBSERVER_TABLE, PREFIX


def _verify_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if re.fullmatch(rf"{PREFIX}[0-9]+-[0-9]+[rp]", n))
    except FileNotFoundError:
        return []


def _ruleset(nft: Nft) -> str:
    return nft("list", "ruleset").stdout


_v4 = st.builds(lambda block, low, length: str(ipaddress.ip_network((block << 8 | low, length), strict=False)),
                st.sampled_from([0x0A0001, 0x0A0002, 0xC0000200 >> 8, 0xCB007100 >> 8]), st.integers(0, 255),
                st.integers(20, 32))
_v6 = st.builds(lambda low, length: str(ipaddress.ip_network((0x2001_0DB8 << 96 | low << 80, length), strict=False)),
                st.integers(0, 7), st.sampled_from([40, 48, 64, 127, 128]))
_services = st.fixed_dictionaries({"https": st.lists(st.one_of(_v4, _v6), max_size=6, unique=True),
                                   "postgres": st.lists(st.one_of(_v4, _v6), max_size=6, unique=True)})


# Each example applies and verifies for real (about 2 s): few examples, no shrinking.
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(services=_services, reject=st.booleans())
def test_a_correct_ruleset_agrees_for_random_policies(services: dict[str, list[str]], reject: bool,
                                                      write_policy: PolicyWriter, hostwall: Cli,
                                                      cli_json: CliJson, nft: Nft) -> None:
    write_policy(services, action={"postgres": "reject"} if reject else None)
    assert hostwall("apply").returncode == 0
    before = _ruleset(nft)

    code, report = cli_json("verify", "--seed", "7")

    assert (code, report["agrees"], report["mismatches"]) == (0, True, [])
    assert report["probes"] > 100 and report["elements_probed"] == report["elements_total"]
    assert _ruleset(nft) == before, "verify changed the live ruleset"
    assert _verify_namespaces() == []


def test_an_accept_rule_ahead_of_the_drop_is_caught(write_policy: PolicyWriter, hostwall: Cli,
                                                    cli_json: CliJson, nft: Nft) -> None:
    write_policy({"https": ["203.0.113.0/28"], "postgres": ["10.0.1.0/24", "2001:db8:10::/48"]})
    assert hostwall("apply").returncode == 0
    nft("insert", "rule", "inet", "hostwall", "svc_postgres", "ip", "saddr", "10.0.2.0/24", "accept")

    code, report = cli_json("verify")

    assert code == 10 and not report["agrees"]
    wrong = {(m["address"], m["port"], m["expected"], m["observed"]) for m in report["mismatches"]}
    assert ("10.0.2.0", 5432, "denied", "admitted") in wrong
    assert all(m["port"] == 5432 for m in report["mismatches"])
    table = hostwall("verify")
    assert table.returncode == 10
    assert "10.0.2.0" in table.stdout and "netns-tests" in table.stdout


def test_an_element_removed_by_hand_is_caught(write_policy: PolicyWriter, hostwall: Cli, cli_json: CliJson,
                                              nft: Nft) -> None:
    write_policy({"https": ["203.0.113.45/32", "198.51.100.0/24", "2001:db8:10::/48"]})
    assert hostwall("apply").returncode == 0
    nft("delete", "element", "inet", "hostwall", "https_v6", "{ 2001:db8:10::/48 }")

    code, report = cli_json("verify")

    assert code == 10
    addresses = {(m["address"], m["port"], m["protocol"]) for m in report["mismatches"]}
    assert addresses == {("2001:db8:10::", 443, "tcp"), ("2001:db8:10::", 443, "udp"),
                         ("2001:db8:10:ffff:ffff:ffff:ffff:ffff", 443, "tcp"),
                         ("2001:db8:10:ffff:ffff:ffff:ffff:ffff", 443, "udp")}
    assert all(m["expected"] == "admitted" and m["observed"] == "denied" for m in report["mismatches"])
    assert all(m["entry"].endswith("(netns-tests)") for m in report["mismatches"])


def _probing(replica: str) -> bool:
    """The replica's observer table is loaded: building is over, probing begins."""
    listing = subprocess.run(["ip", "netns", "exec", replica, "nft", "list", "tables"], capture_output=True,
                             text=True, timeout=COMMAND_TIMEOUT, check=False)
    return f"table inet {OBSERVER_TABLE}" in listing.stdout


@pytest.mark.parametrize(("signum", "when", "code"), [(signal.SIGTERM, "building", 143),
                                                      (signal.SIGTERM, "probing", 143),
                                                      (signal.SIGINT, "probing", 1)])
def test_a_signal_mid_run_leaves_no_namespace_and_the_ruleset_alone(signum: int, when: str, code: int, lab: Lab,
                                                                    policy_dir: Path, state_dir: Path, hostwall: Cli,
                                                                    nft: Nft) -> None:
    """The signal lands as soon as the replica namespace exists, or once its observer
    table is loaded (about 2 s of probing follow)."""
    # Long enough (20k entries, about 2 s of probing) that the signal lands mid-run.
    lines = [f"10.{a}.{b}.{c}/32" for a in range(20, 22) for b in range(0, 80) for c in range(1, 250, 2)]
    (policy_dir / "list.txt").write_text("\n".join(lines) + "\n")
    (policy_dir / "policy.yaml").write_text(
        "services:\n  https:\n    allow:\n      - file: list.txt\n        owner: netns-tests\n"
        "        reason: many\n        review_by: 2099-01-01\n")
    assert hostwall("apply").returncode == 0
    before = _ruleset(nft)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}
    process = subprocess.Popen([sys.executable, "-m", "hostwall", "--netns", lab.server, "--policy-dir",
                                str(policy_dir), "--state-dir", str(state_dir), "verify"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        deadline = time.monotonic() + 60
        mine = f"{PREFIX}{process.pid}-"
        while not any(n.startswith(mine) for n in _verify_namespaces()):
            assert time.monotonic() < deadline and process.poll() is None, "verify never built its replica"
            time.sleep(0.01)
        while when == "probing" and not _probing(f"{mine}0r"):
            assert time.monotonic() < deadline and process.poll() is None, "verify never began to probe"
            time.sleep(0.01)
        process.send_signal(signum)
        process.wait(timeout=COMMAND_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == code
    assert not [n for n in _verify_namespaces() if n.startswith(mine)]
    assert _ruleset(nft) == before


@pytest.mark.parametrize("command", [("apply", "--verify"), ("rollback", "--verify")])
def test_apply_and_rollback_verify_after_loading(command: tuple[str, ...], write_policy: PolicyWriter,
                                                 hostwall: Cli, cli_json: CliJson) -> None:
    write_policy({"https": ["203.0.113.0/28"]})
    assert hostwall("apply").returncode == 0
    write_policy({"https": ["203.0.113.0/28", "198.51.100.7/32"]})
    assert hostwall("apply").returncode == 0

    code, document = cli_json(*command)

    assert code == 0, document
    assert document["verify"]["agrees"] is True and document["verify"]["probes"] > 50
    assert _verify_namespaces() == []


def test_a_failed_verify_reverts_an_unconfirmed_change_at_once(write_policy: PolicyWriter, hostwall: Cli,
                                                               cli_json: CliJson, nft: Nft) -> None:
    """Another table drops what the new policy admits: verify, which copies the whole
    ruleset, sees the difference, and the change is reverted before its deadline."""
    write_policy({"https": ["198.51.100.7/32"]})
    assert hostwall("apply").returncode == 0
    nft("-f", "-", stdin="table inet other {\n chain pre {\n  type filter hook prerouting priority -350; "
                          "policy accept;\n  ip saddr 203.0.113.0/28 drop\n }\n}\n")
    write_policy({"https": ["198.51.100.7/32", "203.0.113.0/28"]})

    code, document = cli_json("apply", "--verify", "--confirm-within", "600")

    assert code == 10
    assert document["verify"]["reverted"] is True
    assert {m["address"] for m in document["verify"]["mismatches"]} == {"203.0.113.0", "203.0.113.15"}
    code, status = cli_json("status", "--drops", "0")
    assert status["generation"] == 1 and status["pending"] is None
    assert "203.0.113.0" not in nft("list", "set", "inet", "hostwall", "https_v4").stdout




def test_the_agent_verifies_after_reload_and_records_a_difference(lab: Lab, policy_dir: Path, state_dir: Path,
                                                                  write_policy: PolicyWriter, nft: Nft) -> None:
    """The agent's verifier as `agent --verify-after-reload` builds it, against the lab."""
    write_policy({"https": ["198.51.100.7/32"], "postgres": ["10.0.1.0/24"]})
    options = Options(lab.server, policy_dir, state_dir)
    backend = NftBackend(lab.server)
    sink = _Records()
    state = StateDir(state_dir)
    agent = Agent(Engine(backend, state), state, lambda: load_policy(policy_dir), _Notes(), sink,
                  verify=reload_verifier(options))
    try:
        agent.start()
        agent.reload()
        assert [r for r in sink.records if r.message_id == MESSAGE_ID_VERIFY] == []

        nft("-f", "-", stdin="table inet other {\n chain pre {\n  type filter hook prerouting priority -350; "
                              "policy accept;\n  ip saddr 10.0.1.0/24 tcp dport 5432 drop\n }\n}\n")
        agent.reload()
    finally:
        agent.stop()
        backend.close()
    records = [r for r in sink.records if r.message_id == MESSAGE_ID_VERIFY]
    assert len(records) == 1, [r.message for r in sink.records]
    fields = records[0].fields
    assert fields["HOSTWALL_MISMATCHES"] == "2" and fields["HOSTWALL_SRC"] in ("10.0.1.0", "10.0.1.255")
    assert (fields["HOSTWALL_DPORT"], fields["HOSTWALL_EXPECTED"], fields["HOSTWALL_OBSERVED"]) == \
        ("5432", "admitted", "denied")
    assert _verify_namespaces() == []
