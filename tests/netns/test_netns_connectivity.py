"""Real connections through the kernel: what the allowlist lets in and what it keeps out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from netns_support import (
    COMMAND_TIMEOUT,
    DENY_TIMEOUT,
    OPEN_TIMEOUT,
    CliJson,
    Nft,
    PolicyWriter,
    counters,
    ip_json,
    link_local_address,
    matrix,
    ping,
    probe_tcp_scoped,
    probe_udp_large,
    reach,
    tcp_counters,
)

from hostwall import lab as labmod
from hostwall.lab import Lab

pytestmark = pytest.mark.root

PROTECTED = ("443/tcp", "443/udp", "5432/tcp")
BOTH = (4, 6)


def allow_the_allowed_client(lab: Lab) -> dict[str, list[str]]:
    ok = lab.allowed
    both = [f"{ok.ipv4}/32", f"{ok.ipv6}/128"]
    return {"https": both, "postgres": both}


def apply_ok(cli_json: CliJson) -> dict[str, Any]:
    code, document = cli_json("apply")
    assert code == 0, document
    assert document["applied"] is True, document
    return dict(document)


def test_allowed_client_connects_and_denied_client_times_out(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    everything_open = matrix({"allowed": "open", "denied": "open"}, BOTH, PROTECTED)
    assert reach(lab, everything_open) == everything_open, "the lab is broken before hostwall runs"

    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)

    expected = matrix({"allowed": "open", "denied": "timeout"}, BOTH, PROTECTED)
    assert reach(lab, expected) == expected


def test_reject_action_answers_denied_clients_at_once(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab), action={"postgres": "reject"})
    apply_ok(cli_json)

    expected = {
        **matrix({"allowed": "open", "denied": "refused"}, BOTH, ("5432/tcp",)),
        # https keeps the default action: silent drop.
        **matrix({"denied": "timeout"}, BOTH, ("443/tcp", "443/udp")),
    }
    assert reach(lab, expected) == expected
    # At once: the reset answers the first SYN, which the client never had to send again.
    syns_sent_again = tcp_counters(lab.denied.namespace)["TCPSynRetrans"]
    for address in (lab.denied.server_ipv4, lab.denied.server_ipv6):
        assert labmod.probe_tcp(lab.denied.namespace, address, 5432, COMMAND_TIMEOUT) == "refused"
    assert tcp_counters(lab.denied.namespace)["TCPSynRetrans"] == syns_sent_again

    # UDP has no reset: a rejecting service answers ICMP port unreachable instead.
    write_policy(allow_the_allowed_client(lab), action={"https": "reject"})
    apply_ok(cli_json)
    expected = {
        **matrix({"allowed": "open", "denied": "refused"}, BOTH, ("443/tcp", "443/udp")),
        **matrix({"denied": "timeout"}, BOTH, ("5432/tcp",)),
    }
    assert reach(lab, expected) == expected


def test_revoked_source_loses_its_established_connection(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)
    ok = lab.allowed
    with labmod.connect(ok.namespace, ok.server_ipv4, 5432, timeout=DENY_TIMEOUT) as sock:
        assert labmod.echo(sock, b"before"), "the established connection does not work"

        write_policy({"https": [f"{ok.ipv4}/32"], "postgres": [f"{lab.denied.ipv4}/32"]})
        apply_ok(cli_json)

        dropped = counters(lab.server)["postgres_dropped"]
        sock.settimeout(OPEN_TIMEOUT)  # long enough for a loaded machine's answer, if one came
        assert not labmod.echo(sock, b"after"), "a revoked source kept its established connection"
        # The connection's own segments met the drop rule: the firewall cut it, not a slow server.
        assert counters(lab.server)["postgres_dropped"] > dropped
    # The revocation was specific: https still answers the same client.
    assert reach(lab, {("allowed", 4, "443/tcp"): "open"}) == {("allowed", 4, "443/tcp"): "open"}


def test_ipv4_only_policy_still_denies_every_ipv6_source(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    ok = lab.allowed
    deadline = time.monotonic() + 10
    server_link_local = link_local_address(lab.server, "hwok", deadline)
    link_local_address(ok.namespace, "eth0", deadline)
    ifindex = int(ip_json("-n", ok.namespace, "link", "show", "dev", "eth0")[0]["ifindex"])

    def link_local(port: int, timeout: float) -> tuple[str, str | None]:
        return probe_tcp_scoped(ok.namespace, server_link_local, port, ifindex, timeout)

    for port in (443, 5432):
        result, source = link_local(port, OPEN_TIMEOUT)
        assert result == "open", f"link-local {port} does not work before hostwall runs"
        assert source is not None and source.startswith("fe80:"), source

    write_policy({"https": [f"{ok.ipv4}/32", "10.77.0.0/16"], "postgres": [f"{ok.ipv4}/32"]})
    document = apply_ok(cli_json)
    assert document["warnings"] == []

    expected = {
        **matrix({"allowed": "open"}, (4,), PROTECTED),
        **matrix({"allowed": "timeout", "denied": "timeout"}, (6,), PROTECTED),
    }
    assert reach(lab, expected) == expected
    assert [link_local(port, DENY_TIMEOUT)[0] for port in (443, 5432)] == ["timeout", "timeout"]
    assert link_local(8080, OPEN_TIMEOUT)[0] == "open", "the link-local path itself broke"


def test_loopback_is_always_allowed(lab: Lab, write_policy: PolicyWriter, cli_json: CliJson) -> None:
    write_policy({"https": [], "postgres": []})
    apply_ok(cli_json)

    probe: dict[str, Callable[[str, str, int, float], str]] = {
        "tcp": labmod.probe_tcp, "udp": labmod.probe_udp,
    }
    own = [("127.0.0.1", 443, "tcp"), ("::1", 443, "tcp"), ("127.0.0.1", 443, "udp"),
           ("::1", 5432, "tcp"), (lab.allowed.server_ipv4, 5432, "tcp"),
           (lab.allowed.server_ipv6, 443, "tcp")]
    results = {(address, port, proto): probe[proto](lab.server, address, port, OPEN_TIMEOUT)
               for address, port, proto in own}
    assert results == dict.fromkeys(results, "open")

    # The empty allowlist is in force for everyone else.
    expected = matrix({"allowed": "timeout", "denied": "timeout"}, (4,), ("443/tcp", "5432/tcp"))
    assert reach(lab, expected) == expected


def test_unprotected_port_and_icmp_are_untouched(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)

    expected = {
        **matrix({"allowed": "open", "denied": "open"}, BOTH, ("8080/tcp",)),
        **matrix({"denied": "timeout"}, BOTH, ("443/tcp",)),
    }
    assert reach(lab, expected) == expected
    pings = {(host.namespace, address): ping(host.namespace, address, OPEN_TIMEOUT)
             for host in (lab.allowed, lab.denied)
             for address in (host.server_ipv4, host.server_ipv6)}
    assert pings == dict.fromkeys(pings, True)


def test_a_port_redirected_by_nat_is_filtered_on_the_port_the_client_asked_for(
    lab: Lab, nft: Nft, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    """hostwall runs before DNAT, so a published port (Docker-style) stays protected."""
    for family in ("ip", "ip6"):
        nft("-f", "-", stdin=(
            f"table {family} publish {{\n chain prerouting {{\n"
            "  type nat hook prerouting priority dstnat; policy accept;\n"
            "  tcp dport 5432 redirect to :8080\n }\n}\n"))
    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)

    # Behind the redirect answers the 8080 echo; after hostwall, only for the allowed client.
    expected = matrix({"allowed": "open", "denied": "timeout"}, BOTH, ("5432/tcp",))
    assert reach(lab, expected) == expected
    plain = matrix({"denied": "open"}, BOTH, ("8080/tcp",))
    assert reach(lab, plain) == plain


@pytest.mark.parametrize("conntrack", [False, True], ids=["no-conntrack", "conntrack"])
def test_fragmented_datagrams_do_not_get_past_the_allowlist(
    lab: Lab, nft: Nft, write_policy: PolicyWriter, cli_json: CliJson, conntrack: bool
) -> None:
    if conntrack:
        # A ct expression makes the kernel track, and so defragment (priority -400),
        # in this namespace, as on a host running Docker or firewalld.
        nft("-f", "-", stdin="table inet tracking {\n chain pre {\n"
                             "  type filter hook prerouting priority 0; policy accept;\n"
                             "  ct state new counter\n }\n}\n")
    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)

    size = 4000  # the lab's veth MTU is 1500
    targets = [(host, address) for host in (lab.allowed, lab.denied)
               for address in (host.server_ipv4, host.server_ipv6)]
    results = {
        (host.namespace, address): probe_udp_large(
            host.namespace, address, 443, size, OPEN_TIMEOUT if host is lab.allowed else DENY_TIMEOUT)
        for host, address in targets
    }
    assert results == {(host.namespace, address): "open" if host is lab.allowed else "timeout"
                       for host, address in targets}

    code, status = cli_json("status")
    assert code == 0, status
    https = next(s for s in status["services"] if s["name"] == "https")
    assert https["accepted_packets"] > 0 and https["dropped_packets"] > 0
    if conntrack:
        # Reassembled before hostwall: the counters saw two whole 4000-byte datagrams.
        assert https["accepted_bytes"] > 2 * size and https["dropped_bytes"] > 2 * size


def test_status_counters_move_with_real_traffic(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    apply_ok(cli_json)
    code, before = cli_json("status")
    assert code == 0, before
    assert {s["name"]: (s["accepted_packets"], s["dropped_packets"]) for s in before["services"]} == {
        "https": (0, 0), "postgres": (0, 0)}

    expected = {("allowed", 4, "443/tcp"): "open", ("denied", 6, "443/tcp"): "timeout"}
    assert reach(lab, expected) == expected

    code, after = cli_json("status")
    assert code == 0, after
    assert after["drift"] == []
    counters = {s["name"]: s for s in after["services"]}
    assert counters["https"]["accepted_packets"] > 0
    assert counters["https"]["dropped_packets"] > 0
    assert counters["postgres"]["accepted_packets"] == counters["postgres"]["dropped_packets"] == 0


def test_an_expiring_entry_leaves_the_kernel_on_time(
    lab: Lab, policy_dir: Path, cli_json: CliJson, nft: Nft
) -> None:
    """No hostwall process runs when the entry expires: the kernel's set timeout does it.

    On time is read from the kernel's own countdown, bounded by when it was read; the
    probes only wait for what must happen, with deadlines a loaded machine cannot miss."""
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=15)
    ok = lab.allowed
    (policy_dir / "policy.yaml").write_text(yaml.safe_dump({"services": {"https": {"allow": [
        {"cidr": f"{ok.ipv4}/32", "owner": "netns-tests", "reason": "expires soon",
         "review_by": "2099-01-01", "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ")},
        {"cidr": f"{ok.ipv6}/128", "owner": "netns-tests", "reason": "stays",
         "review_by": "2099-01-01"},
    ]}}}))
    apply_ok(cli_json)
    read_from = time.time()
    listing = json.loads(nft("-j", "list", "set", "inet", "hostwall", "https_v4_hosts").stdout)
    read_until = time.time()
    (element,) = [e["elem"] for item in listing["nftables"] if "set" in item for e in item["set"].get("elem", [])
                  if isinstance(e, dict) and e.get("elem", {}).get("val") == ok.ipv4]
    # hostwall rounds the timeout up to whole seconds; nft lists whole seconds left.
    end = expires.timestamp()
    assert end - read_until - 1 <= element["expires"] <= end + 1 - read_from, (element, end - read_from)
    before = {("allowed", 4, "443/tcp"): "open", ("allowed", 6, "443/tcp"): "open"}
    assert reach(lab, before) == before

    time.sleep(max(0.0, end - time.time()))
    after = {("allowed", 4, "443/tcp"): "timeout", ("allowed", 6, "443/tcp"): "open"}
    deadline = end + 60
    while reach(lab, after) != after and time.time() < deadline:
        time.sleep(0.5)
    assert reach(lab, after) == after

    code, status = cli_json("status")
    assert (code, status["drift"]) == (0, []), status
    https = next(s for s in status["services"] if s["name"] == "https")
    assert https["entries"] == 1


def test_a_missing_namespace_never_falls_back_to_the_current_one(
    lab: Lab, nft: Nft, write_policy: PolicyWriter, policy_dir: Path, state_dir: Path
) -> None:
    """A typo in --netns must fail, not load the firewall where hostwall runs.

    hostwall itself runs inside the lab's server namespace here, so that even a fallback
    bug could only touch the lab.
    """
    write_policy(allow_the_allowed_client(lab))
    result = subprocess.run(
        ["ip", "netns", "exec", lab.server, sys.executable, "-m", "hostwall",
         "--netns", f"{lab.prefix}-missing", "--policy-dir", str(policy_dir),
         "--state-dir", str(state_dir), "apply", "--json"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
    )
    assert result.returncode == 4, result.stderr
    assert json.loads(result.stdout)["kind"] == "NetnsNotFound"
    assert "hostwall" not in nft("list", "tables").stdout
