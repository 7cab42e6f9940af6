"""The replica: a throw-away network namespace that holds a copy of a namespace's whole
ruleset, and a second one that sends probes into it. The only place verify touches
the kernel; the namespace it copies from is only read.

    probe namespace                         replica namespace
    hwvprobe  ── veth ──────────────▶ <first interface's name>   (+ dummies named
    AF_PACKET frames from any source        like the other interfaces, so that
                                            `iif` rules load and match the same)

An admitted TCP SYN reaches a listener, which answers with a SYN-ACK; an observer
table in the replica records each SYN-ACK's destination address and port in a set
at the output hook, before the neighbour lookup that would fail for sources nobody
owns. A UDP datagram is observed by the listener that reads it. Each probe has its
own source port, so (source, source port) names the probe. A counter at the first
prerouting hook counts what arrived, so probes lost on the way (a full backlog) are
told apart from dropped ones and sent again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from itertools import count
from typing import Any

from msgspec import Struct, field

from hostwall import netns
from hostwall.errors import KernelError, KernelUnavailable
from hostwall.nft import NftBackend
from hostwall.nftnl import NetlinkTable
from hostwall.processes import pid_alive as _pid_alive
from hostwall.verify.packets import frame, packed_address
from hostwall.verify.probes import Probe

PREFIX = "hwv"
PROBE_DEVICE = "hwvprobe"
FALLBACK_DEVICE = "hwv0"  # when the copied namespace has no interface but lo
OBSERVER_TABLE = "hostwall_verify"
# A MAC nobody has: replies leave the replica towards it and are discarded by the
# probe namespace's veth as frames for another host.
GATEWAY_MAC = "02:00:00:00:00:01"
GATEWAY = {4: "169.254.0.1", 6: "fe80::1"}
SOURCE_PORTS = (20000, 60000)
ROUNDS = 3
SETTLE_SECONDS = 0.2
BATCH = 256  # frames between checks of the UDP listeners, so their buffers never fill
_IP_PATHS = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
_sequence = count()


def _ip_command() -> str:
    # A fixed path, not the caller's PATH: verify runs as root for an operator.
    for path in _IP_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise KernelUnavailable("iproute2's ip command is missing (install iproute2)")


def ip(*args: str, namespace: str | None = None) -> str:
    command = [_ip_command()]
    if namespace is not None:
        command += ["-n", namespace]
    try:
        result = subprocess.run([*command, *args], check=False, capture_output=True, text=True, timeout=30,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, cwd="/")
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"ip {' '.join(args)} did not finish in 30 s") from exc
    if result.returncode != 0:
        raise KernelError(f"ip {' '.join(args)}: {' '.join(result.stderr.split())[:300]}")
    return result.stdout


@contextlib.contextmanager
def _unwinding_signals_held() -> Iterator[None]:
    """SIGTERM and SIGINT held back in this thread, and delivered once the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def interface_names(namespace: str | None) -> list[str]:
    """The namespace's interfaces other than lo, by index."""
    links = json.loads(ip("-j", "link", "show", namespace=namespace) or "[]")
    return [str(link["ifname"]) for link in sorted(links, key=lambda link: int(link["ifindex"]))
            if link["ifname"] != "lo"]


def leftover_namespaces(names: Sequence[str], alive: Any = None) -> list[str]:
    """Replica and probe namespaces whose creating process is gone (killed with SIGKILL)."""
    alive = alive or _pid_alive
    found = []
    for name in names:
        if not name.startswith(PREFIX) or "-" not in name:
            continue
        pid_text = name[len(PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not alive(int(pid_text)):
            found.append(name)
    return found


def _namespaces() -> list[str]:
    try:
        return sorted(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def sweep_leftovers() -> list[str]:
    removed = []
    for name in leftover_namespaces(_namespaces()):
        with contextlib.suppress(KernelError):
            ip("netns", "delete", name)
            removed.append(name)
    return removed


def observer_ruleset(probe_interface: str) -> str:
    return (
        f"table inet {OBSERVER_TABLE} {{\n"
        "\tcounter arrived {}\n"
        "\tset tcp4 { type ipv4_addr . inet_service; size 4194304; flags dynamic; }\n"
        "\tset tcp6 { type ipv6_addr . inet_service; size 4194304; flags dynamic; }\n"
        "\tchain arrive {\n"
        "\t\ttype filter hook prerouting priority -1000; policy accept;\n"
        f'\t\tiifname "{probe_interface}" meta l4proto {{ tcp, udp }} counter name arrived\n'
        "\t}\n"
        "\tchain answer {\n"
        "\t\ttype filter hook output priority 1000; policy accept;\n"
        "\t\ttcp flags & (syn | ack) == syn | ack add @tcp4 { ip daddr . tcp dport }\n"
        "\t\ttcp flags & (syn | ack) == syn | ack add @tcp6 { ip6 daddr . tcp dport }\n"
        "\t}\n"
        "}\n"
    )


class Replica(Struct):
    """Build with open(); everything it created goes with close(), whatever happened."""

    source_netns: str | None
    destination: dict[int, str]  # the replica's own address per family, never a probe source
    name: str = ""
    probe_name: str = ""
    interface: str = ""
    ruleset_text: str = ""
    _backend: NftBackend | None = None
    _observer: NetlinkTable | None = None
    _listeners: list[socket.socket] = field(default_factory=list)
    _udp: dict[tuple[int, int], socket.socket] = field(default_factory=dict)
    _created: list[str] = field(default_factory=list)

    def open(self, tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> None:
        names = interface_names(self.source_netns)
        source = NftBackend(self.source_netns)
        try:
            self.ruleset_text = source.list_ruleset()
        finally:
            source.close()
        if f"table inet {OBSERVER_TABLE} " in self.ruleset_text:
            raise KernelError(f"the namespace already holds a table inet {OBSERVER_TABLE} (is it a replica?)")
        tag = f"{PREFIX}{os.getpid()}-{next(_sequence)}"
        self.name, self.probe_name = f"{tag}r", f"{tag}p"
        for name in (self.name, self.probe_name):
            # Recorded first: a signal right after `ip netns add` returns must not leave
            # a namespace that close() does not know of. Made with the signals that unwind
            # verify held back: one that lands after the fork of `ip netns add` but before
            # subprocess knows of the child unwinds without killing it, and the child adds
            # the namespace after close() has looked for it.
            self._created.append(name)
            with _unwinding_signals_held():
                ip("netns", "add", name)
        self.interface = names[0] if names else FALLBACK_DEVICE
        ip("link", "add", PROBE_DEVICE, "type", "veth", "peer", "name", self.interface, "netns", self.name,
           namespace=self.probe_name)
        # veth rather than dummy: the dummy driver is often not built (containers).
        for number, other in enumerate(names[1:]):
            ip("link", "add", f"{PROBE_DEVICE}{number}", "type", "veth", "peer", "name", other, "netns", self.name,
               namespace=self.probe_name)
        for device in ("lo", *dict.fromkeys([self.interface, *names])):
            ip("link", "set", device, "up", namespace=self.name)
        ip("link", "set", PROBE_DEVICE, "up", namespace=self.probe_name)
        self._configure()
        self._backend = NftBackend(self.name)
        if self.ruleset_text.strip():
            self._backend.load_text(self.ruleset_text)
        self._backend.load_text(observer_ruleset(self.interface))
        self._observer = NetlinkTable(self.name, OBSERVER_TABLE)
        self._listen(tcp_ports, udp_ports)

    def _configure(self) -> None:
        device = self.interface
        with netns.entered(self.name):
            # Sources come from anywhere: no reverse-path filter of the replica's own
            # (hostwall's strict_source is a rule in the ruleset and still applies), and
            # SYN cookies so that a full SYN queue still answers.
            for path, value in (("ipv4/conf/all/rp_filter", "0"), (f"ipv4/conf/{device}/rp_filter", "0"),
                                ("ipv4/tcp_syncookies", "1"), ("core/somaxconn", "65535"),
                                ("ipv4/tcp_max_syn_backlog", "65535"), (f"ipv6/conf/{device}/accept_dad", "0")):
                with open(f"/proc/sys/net/{path}", "w") as sysctl:
                    sysctl.write(value)
        ip("addr", "add", f"{self.destination[4]}/32", "dev", device, namespace=self.name)
        ip("addr", "add", f"{self.destination[6]}/128", "dev", device, "nodad", namespace=self.name)
        ip("route", "add", "default", "via", GATEWAY[4], "dev", device, "onlink", namespace=self.name)
        ip("-6", "route", "add", "default", "via", GATEWAY[6], "dev", device, namespace=self.name)
        ip("-6", "route", "replace", "fe80::/64", "dev", device, namespace=self.name)
        for family in (4, 6):
            ip("neigh", "replace", GATEWAY[family], "lladdr", GATEWAY_MAC, "dev", device, "nud", "permanent",
               namespace=self.name)

    def _listen(self, tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> None:
        with netns.entered(self.name):
            for family, address_family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
                for port in tcp_ports:
                    self._listeners.append(_bound(address_family, socket.SOCK_STREAM, port))
                    self._listeners[-1].listen(65535)
                for port in udp_ports:
                    sock = _bound(address_family, socket.SOCK_DGRAM, port)
                    # root may exceed rmem_max: one buffer holds a whole round of datagrams.
                    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
                    sock.setblocking(False)
                    self._listeners.append(sock)
                    self._udp[(family, port)] = sock

    def close(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        self._udp.clear()
        for adapter in (self._backend, self._observer):
            if adapter is not None:
                adapter.close()
        self._backend = self._observer = None
        errors = []
        for name in reversed(self._created):
            if not os.path.lexists(netns.netns_path(name)):
                continue  # never created: the signal came before `ip netns add` did it
            try:
                ip("netns", "delete", name)
            except KernelError as error:
                errors.append(str(error))
        self._created.clear()
        if errors:
            raise KernelError(f"could not remove the verify namespaces: {'; '.join(errors)}")

    def _mac(self, namespace: str, device: str) -> bytes:
        link = json.loads(ip("-j", "link", "show", "dev", device, namespace=namespace))[0]
        return bytes.fromhex(str(link["address"]).replace(":", ""))

    def _arrived(self) -> int:
        assert self._observer is not None
        packets = self._observer.counter_packets("arrived")
        if packets is None:
            raise KernelError(f"the replica's table {OBSERVER_TABLE} lost its counter")
        return packets

    def _answered(self, family: int) -> set[tuple[int, int]]:
        """(address, port) of each SYN-ACK: keys of the observer's set, the address then
        the port in a 4-byte register (network order, first 2 bytes)."""
        assert self._observer is not None
        width = 4 if family == 4 else 16
        return {(int.from_bytes(key[:width], "big"), int.from_bytes(key[width:width + 2], "big"))
                for key in self._observer.set_keys(f"tcp{family}")}

    def observe(self, probes: Sequence[Probe]) -> list[bool]:
        """Send every probe, again for those not observed while some got lost on the way,
        and say which were answered."""
        assert self._backend is not None
        ports = _source_ports(probes)
        answered = [False] * len(probes)
        pending = list(range(len(probes)))
        ethernet = self._mac(self.name, self.interface) + self._mac(self.probe_name, PROBE_DEVICE)
        destination = {family: packed_address(self.destination[family]) for family in (4, 6)}
        received: set[tuple[int, int, int, int]] = set()  # family, source, source port, port
        lost = 0
        for _ in range(ROUNDS):
            before = self._arrived()
            with netns.entered(self.probe_name):
                sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            with sender:
                sender.bind((PROBE_DEVICE, 0))
                for position, index in enumerate(pending):
                    probe = probes[index]
                    sender.send(frame(probe.family, probe.address, destination[probe.family],
                                      probe.target.protocol, ports[index], probe.target.port, ethernet))
                    if position % BATCH == BATCH - 1:
                        self._drain(received)
            time.sleep(SETTLE_SECONDS)
            self._drain(received)
            lost = len(pending) - (self._arrived() - before)
            tcp = {4: self._answered(4), 6: self._answered(6)}
            for index in pending:
                probe = probes[index]
                if probe.target.protocol == "tcp":
                    answered[index] = (probe.address, ports[index]) in tcp[probe.family]
                else:
                    answered[index] = (probe.family, probe.address, ports[index], probe.target.port) in received
            if lost <= 0:
                return answered
            pending = [index for index in pending if not answered[index]]
        raise KernelError(f"{lost} of the last round's probes never reached the replica after {ROUNDS} rounds; "
                          "the machine is too busy to tell a drop from a loss")

    def _drain(self, received: set[tuple[int, int, int, int]]) -> None:
        for (family, port), sock in self._udp.items():
            while True:
                try:
                    _, sender = sock.recvfrom(64)
                except BlockingIOError:
                    break
                received.add((family, int(ipaddress.ip_address(sender[0].split("%")[0])), int(sender[1]), port))


def _bound(address_family: socket.AddressFamily, kind: socket.SocketKind, port: int) -> socket.socket:
    sock = socket.socket(address_family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address_family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if address_family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


def _source_ports(probes: Sequence[Probe]) -> list[int]:
    """A source port per probe, distinct among the probes from the same address."""
    used: dict[tuple[int, int], int] = {}
    ports = []
    low, high = SOURCE_PORTS
    for probe in probes:
        key = (probe.family, probe.address)
        offset = used.get(key, 0)
        if offset > high - low:
            raise KernelError(f"more than {high - low} probes from {probe.address_text}")
        used[key] = offset + 1
        ports.append(low + offset)
    return ports


@contextlib.contextmanager
def opened(source_netns: str | None, destination: dict[int, str], tcp_ports: Sequence[int],
           udp_ports: Sequence[int]) -> Iterator[Replica]:
    replica = Replica(source_netns, destination)
    try:
        replica.open(tcp_ports, udp_ports)
        yield replica
    finally:
        replica.close()


def opened_for(source_netns: str | None) -> Callable[[dict[int, str], Sequence[int], Sequence[int]],
                                                      AbstractContextManager[Replica]]:
    """opened() bound to the namespace it copies, as verify.run.verify takes it."""

    def open_replica(destination: dict[int, str], tcp_ports: Sequence[int],
                     udp_ports: Sequence[int]) -> AbstractContextManager[Replica]:
        return opened(source_netns, destination, tcp_ports, udp_ports)

    return open_replica
