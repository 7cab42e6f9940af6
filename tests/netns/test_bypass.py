"""The bypass battery: every way around a host allowlist that host firewalls have shipped
with, tried with real packets against the lab.

Each denial is also seen in hostwall's drop counter, and each crafted packet is first
shown to work where it should (an allowed source, or no firewall), so no test here can
pass because the packet was malformed or nothing was listening.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import craft
import pytest
import yaml
from netns_support import (
    DENY_TIMEOUT,
    OPEN_TIMEOUT,
    Cli,
    CliJson,
    Harness,
    Nft,
    PolicyWriter,
    counters,
    link_local_address,
    matrix,
    probe_tcp_scoped,
    reach,
    run_nft,
)
from services import add_client_link

from hostwall import netns
from hostwall.drops import origin_of
from hostwall.lab import Lab, probe_udp
from hostwall.nflog import NflogReader, NflogSettings
from hostwall.packet import decode

pytestmark = pytest.mark.root

BOTH_PORTS = ("443/tcp", "5432/tcp")


def apply(cli_json: CliJson) -> None:
    code, document = cli_json("apply")
    assert code == 0, document


def allow_the_allowed_client(lab: Lab) -> dict[str, list[str]]:
    ok = lab.allowed
    return {name: [f"{ok.ipv4}/32", f"{ok.ipv6}/128"] for name in ("https", "postgres")}


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


# --- Docker-style published port ---------------------------------------------------------


@contextlib.contextmanager
def tagged_listener(namespace: str, address: str, port: int, tag: bytes) -> Iterator[None]:
    """Answers every connection with tag + what it read: proof of who answered."""
    with netns.entered(namespace):
        server = socket.create_server((address, port))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.sendall(tag + connection.recv(64))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def ask(namespace: str, address: str, port: int, timeout: float) -> bytes | str:
    with netns.entered(namespace):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.sendall(b"ping")
            return sock.recv(64)
        except TimeoutError:
            return "timeout"
        except ConnectionError:
            return "refused"


@pytest.fixture
def container(lab: Lab) -> Iterator[str]:
    """A "container" namespace behind the server, its 5432 published on the host's
    addresses the way Docker does it: DNAT at priority -100 and forwarding on."""
    name = f"{lab.prefix}-ctr"
    try:
        add_client_link(lab.server, name, "hwctr", ("10.88.0.2/24",), ("10.88.0.1/24",))
        subprocess.run(["ip", "-n", name, "route", "add", "default", "via", "10.88.0.1"], check=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", lab.server, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True, timeout=10)
        run_nft(lab.server, "-f", "-", stdin=(
            "table ip docker_like {\n"
            "  chain prerouting {\n"
            "    type nat hook prerouting priority -100; policy accept;\n"
            "    fib daddr type local tcp dport 5432 dnat to 10.88.0.2:5432\n"
            "  }\n"
            "}\n"))
        with tagged_listener(name, "10.88.0.2", 5432, b"container:"):
            yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


def test_docker_style_published_port_answers_only_allowed_clients(
    lab: Lab, container: str, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    ok, bad = lab.allowed, lab.denied
    # Without hostwall the published port reaches the container from everywhere.
    assert ask(bad.namespace, bad.server_ipv4, 5432, OPEN_TIMEOUT) == b"container:ping"

    write_policy(allow_the_allowed_client(lab))
    apply(cli_json)
    before = counters(lab.server)
    assert ask(ok.namespace, ok.server_ipv4, 5432, OPEN_TIMEOUT) == b"container:ping"
    assert ask(bad.namespace, bad.server_ipv4, 5432, DENY_TIMEOUT) == "timeout"
    change = moved(before, counters(lab.server))
    assert change.get("postgres_dropped", 0) >= 1 and change.get("postgres_accepted", 0) >= 1, change


# --- IPv6 --------------------------------------------------------------------------------


def test_ipv6_global_and_link_local_sources_are_denied_on_both_ports(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    bad = lab.denied
    deadline = time.monotonic() + 10
    server_link_local = link_local_address(lab.server, "hwbad", deadline)
    link_local_address(bad.namespace, "eth0", deadline)
    ifindex = _ifindex(bad.namespace, "eth0")

    def over_link_local(port: int, timeout: float) -> str:
        return probe_tcp_scoped(bad.namespace, server_link_local, port, ifindex, timeout)[0]

    assert [over_link_local(port, OPEN_TIMEOUT) for port in (443, 5432)] == ["open", "open"], "no path to deny"

    write_policy(allow_the_allowed_client(lab))
    apply(cli_json)
    before = counters(lab.server)
    expected = {**matrix({"allowed": "open", "denied": "timeout"}, (6,), BOTH_PORTS)}
    assert reach(lab, expected) == expected
    assert [over_link_local(port, DENY_TIMEOUT) for port in (443, 5432)] == ["timeout", "timeout"]
    change = moved(before, counters(lab.server))
    # Two denied clients per port (global and link-local), each retransmitting its SYN.
    assert change.get("https_dropped", 0) >= 2 and change.get("postgres_dropped", 0) >= 2, change
    assert over_link_local(8080, OPEN_TIMEOUT) == "open", "the link-local path itself broke"


def _ifindex(namespace: str, device: str) -> int:
    with netns.entered(namespace):
        return socket.if_nametoindex(device)


# --- IPv4-mapped IPv6 --------------------------------------------------------------------


def test_ipv4_mapped_entries_are_refused_and_mapped_sources_are_dropped(
    lab: Lab, policy_dir: Path, write_policy: PolicyWriter, hostwall: Cli, cli_json: CliJson
) -> None:
    ok = lab.allowed
    mapped = f"::ffff:{ok.ipv4}"
    write_policy({"https": [f"{mapped}/128"]})
    result = hostwall("apply")
    assert result.returncode == 3, result.stderr
    assert "IPv4-mapped" in result.stderr and str(policy_dir / "policy.yaml") in result.stderr
    assert run_nft(lab.server, "list", "table", "inet", "hostwall", check=False).returncode != 0

    write_policy(allow_the_allowed_client(lab))
    apply(cli_json)
    wire = craft.Wire(ok.namespace, "eth0", lab.server, "hwok")
    before = counters(lab.server)
    payload = craft.udp(mapped, ok.server_ipv6, 40443, 443, b"ping")
    wire.send([craft.ipv6(mapped, ok.server_ipv6, craft.PROTO_UDP, payload)])
    time.sleep(0.3)
    assert moved(before, counters(lab.server)) == {"https_dropped": 1}
    # The same datagram from the client's real address is accepted: the crafting is sound.
    real = craft.udp(ok.ipv6, ok.server_ipv6, 40443, 443, b"ping")
    wire.send([craft.ipv6(ok.ipv6, ok.server_ipv6, craft.PROTO_UDP, real)])
    time.sleep(0.3)
    assert moved(before, counters(lab.server)) == {"https_dropped": 1, "https_accepted": 1}


# --- fragments ---------------------------------------------------------------------------


def _fragmented_syn(host_ipv4: str, server_ipv4: str, v6: bool, host_ipv6: str, server_ipv6: str,
                    first: int) -> list[bytes]:
    source, destination = (host_ipv6, server_ipv6) if v6 else (host_ipv4, server_ipv4)
    segment = craft.tcp_syn(source, destination, craft.source_port() + first + v6, 5432)
    split = craft.ipv6_fragments if v6 else craft.ipv4_fragments
    return split(source, destination, craft.PROTO_TCP, segment, first)


def test_fragmented_syns_from_denied_clients_get_no_answer(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    apply(cli_json)
    wires = {
        "allowed": (lab.allowed, craft.Wire(lab.allowed.namespace, "eth0", lab.server, "hwok")),
        "denied": (lab.denied, craft.Wire(lab.denied.namespace, "eth0", lab.server, "hwbad")),
    }
    for host, _ in wires.values():
        craft.watch_syn_acks(host.namespace, 5432)

    def answered(role: str, v6: bool, first: int) -> tuple[int, dict[str, int]]:
        host, wire = wires[role]
        before, acks = counters(lab.server), craft.syn_acks(host.namespace)
        wire.send(_fragmented_syn(host.ipv4, host.server_ipv4, v6, host.ipv6, host.server_ipv6, first))
        time.sleep(0.5)
        return craft.syn_acks(host.namespace) - acks, moved(before, counters(lab.server))

    # The crafted fragments are sound: reassembled, they open a connection for an allowed
    # client (IPv4 with 8 bytes of TCP first; IPv6 with the whole header first, since
    # Linux discards an IPv6 first fragment without it, RFC 7112).
    assert answered("allowed", False, 8)[0] == 1
    assert answered("allowed", True, 24)[0] == 1
    for v6, first in ((False, 8), (True, 8), (True, 24)):
        syn_acks, change = answered("denied", v6, first)
        assert syn_acks == 0, f"a fragmented SYN (IPv{6 if v6 else 4}, first fragment {first} bytes) was answered"
        assert change.get("postgres_dropped", 0) >= 1, change


# --- coexistence with other tools --------------------------------------------------------


OTHER_TOOLS = """table inet filter {
  chain input {
    type filter hook input priority 0; policy accept;
    tcp dport 8080 accept
    ip saddr 192.0.2.0/24 drop
  }
}
"""


@contextlib.contextmanager
def owned_table(namespace: str) -> Iterator[None]:
    """A table that exists only while the nft process that created it runs (flags owner),
    as a long-running daemon's would."""
    process = subprocess.Popen(["ip", "netns", "exec", namespace, "nft", "-i"], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdin is not None
        process.stdin.write("add table inet owned { flags owner; }\n"
                            "add chain inet owned guard { type filter hook input priority 10; policy accept; }\n"
                            "add rule inet owned guard ip saddr 198.51.100.0/24 drop\n")
        process.stdin.flush()
        deadline = time.monotonic() + 10
        while run_nft(namespace, "list", "table", "inet", "owned", check=False).returncode != 0:
            assert time.monotonic() < deadline, "the owned table did not appear"
            time.sleep(0.05)
        yield
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdin is not None:
            process.stdin.close()


def test_other_tools_tables_are_byte_identical_after_apply_rollback_and_agent_stop(
    lab: Lab, policy_dir: Path, state_dir: Path, tmp_path: Path, write_policy: PolicyWriter,
    cli_json: CliJson, nft: Nft, journald: object
) -> None:
    nft("-f", "-", stdin=OTHER_TOOLS)
    with owned_table(lab.server):

        def others() -> list[str]:
            return [nft("-a", "list", "table", "inet", name).stdout for name in ("filter", "owned")]

        original = others()
        write_policy(allow_the_allowed_client(lab))
        apply(cli_json)
        assert others() == original, "apply changed another tool's table"
        write_policy({"https": [f"{lab.allowed.ipv4}/32"]}, ports={"https": [443, 8443]})
        apply(cli_json)
        code, document = cli_json("rollback")
        assert code == 0, document
        assert others() == original, "rollback changed another tool's table"

        write_policy(allow_the_allowed_client(lab))  # what the agent loads at start
        agent = Harness(lab, policy_dir, state_dir, tmp_path)
        try:
            agent.wait_for("READY=1")
            assert agent.stop() == 0
        finally:
            agent.close()
        assert others() == original, "the agent changed another tool's table"
        expected = matrix({"allowed": "open", "denied": "timeout"}, (4,), ("5432/tcp",))
        assert reach(lab, expected) == expected


# --- spoofed sources ---------------------------------------------------------------------


def test_strict_source_drops_an_allowed_address_arriving_on_the_wrong_link(
    lab: Lab, policy_dir: Path, cli_json: CliJson
) -> None:
    ok, bad = lab.allowed, lab.denied
    for key in ("all", "default", "hwok", "hwbad"):  # the kernel's own reverse-path filter stays out of it
        subprocess.run(["ip", "netns", "exec", lab.server, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"],
                       check=True, timeout=10)
    craft.watch_syn_acks(ok.namespace, 5432)
    spoofer = craft.Wire(bad.namespace, "eth0", lab.server, "hwbad")

    def spoofed_syn(strict: bool, source_port: int) -> tuple[int, dict[str, int]]:
        document = {
            "settings": {"strict_source": strict},
            "services": {"postgres": {"allow": [{"cidr": f"{ok.ipv4}/32", "owner": "t", "reason": "t",
                                                 "review_by": "2099-01-01"}]}},
        }
        (policy_dir / "policy.yaml").write_text(yaml.safe_dump(document))
        apply(cli_json)
        before, acks = counters(lab.server), craft.syn_acks(ok.namespace)
        # The denied client's link, the allowed client's address; the answer goes to the
        # allowed client, which is where the observer counts it.
        spoofer.send([craft.ipv4(ok.ipv4, bad.server_ipv4, craft.PROTO_TCP,
                                 craft.tcp_syn(ok.ipv4, bad.server_ipv4, source_port, 5432))])
        time.sleep(0.5)
        return craft.syn_acks(ok.namespace) - acks, moved(before, counters(lab.server))

    # Strict first: the control below leaves a half-open connection whose SYN-ACK the
    # server may send again. The drop log is read as the agent reads it: the spoofed
    # packet must be logged, with the prefix that marks the reverse-path drop.
    reader = NflogReader(NflogSettings(group=100), lab.server)
    try:
        syn_acks, change = spoofed_syn(True, craft.source_port())
        logged = []
        for _ in range(20):  # bounded: the kernel flushes its batch within 100 ms
            result = reader.read(0.5)
            logged += [packet for packet in result.packets if decode(packet.payload).src == ok.ipv4]
            if logged:
                break
    finally:
        reader.close()
    assert syn_acks == 0, f"strict_source let a spoofed allowed source in: {change}"
    assert change == {"postgres_dropped": 1}
    assert [origin_of(packet.prefix) for packet in logged] == [("postgres", "spoofed-source")]
    syn_acks, change = spoofed_syn(False, craft.source_port() + 1)
    assert syn_acks == 1 and change.get("postgres_accepted") == 1, "without strict_source the spoof gets in"
    # The real client on its own link is still allowed.
    expected = {("allowed", 4, "5432/tcp"): "open"}
    assert reach(lab, expected) == expected


# --- HTTP/3 ------------------------------------------------------------------------------


def test_http3_udp_443_is_dropped_for_denied_clients(
    lab: Lab, write_policy: PolicyWriter, cli_json: CliJson
) -> None:
    write_policy(allow_the_allowed_client(lab))
    apply(cli_json)
    before = counters(lab.server)
    for family in (4, 6):
        ok_address = lab.allowed.server_ipv4 if family == 4 else lab.allowed.server_ipv6
        bad_address = lab.denied.server_ipv4 if family == 4 else lab.denied.server_ipv6
        assert probe_udp(lab.allowed.namespace, ok_address, 443, OPEN_TIMEOUT) == "open"
        assert probe_udp(lab.denied.namespace, bad_address, 443, DENY_TIMEOUT) == "timeout"
    change = moved(before, counters(lab.server))
    assert change.get("https_dropped", 0) >= 2 and change.get("https_accepted", 0) >= 2, change
