"""A network-namespace lab: a server and two clients on veth links, IPv4 and IPv6.

Used by the demo and the namespace tests. Nothing here touches the root namespace's
firewall: hostwall is pointed at the server namespace with --netns, and every socket
is created inside the namespace it belongs to.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from itertools import count

from msgspec import Struct, field

from hostwall import netns

TCP_PORTS = (443, 5432, 8080)  # 8080 is never protected: traffic to it must pass untouched
UDP_PORTS = (443,)
_sequence = count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Host(Struct, frozen=True):
    namespace: str
    ipv4: str
    ipv6: str
    server_ipv4: str
    server_ipv6: str


class Lab(Struct):
    """server <-veth-> allowed client, server <-veth-> denied client."""

    prefix: str
    server: str
    allowed: Host
    denied: Host
    _servers: list[socketserver.BaseServer] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.server, self.allowed.namespace, self.denied.namespace]

    def start_services(self, tcp_ports: tuple[int, ...] = TCP_PORTS, udp_ports: tuple[int, ...] = UDP_PORTS) -> None:
        """Echo listeners on the protected ports (and 8080), dual-stack, in the server namespace."""
        for port in tcp_ports:
            self._start(_DualStackTCPServer, port, _TcpEcho)
        for port in udp_ports:
            self._start(_DualStackUDPServer, port, _UdpEcho)

    def _start(self, server_class: type[socketserver.BaseServer], port: int,
               handler: type[socketserver.BaseRequestHandler]) -> None:
        with netns.entered(self.server):
            server = server_class(("::", port), handler)
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def destroy(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


class _TcpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connection: socket.socket = self.request
        connection.settimeout(30)
        with contextlib.suppress(OSError):
            while data := connection.recv(4096):
                connection.sendall(data)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


def _dual_stack_bind(server: socketserver.TCPServer) -> None:
    server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    socketserver.TCPServer.server_bind(server)


class _DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        _dual_stack_bind(self)


class _DualStackUDPServer(socketserver.ThreadingUDPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def server_bind(self) -> None:
        _dual_stack_bind(self)


def create_lab(prefix: str | None = None) -> Lab:
    prefix = prefix or f"hw{os.getpid()}x{next(_sequence)}"
    server = f"{prefix}-srv"
    hosts = []
    created: list[str] = []
    try:
        _ip("netns", "add", server)
        created.append(server)
        _ip("-n", server, "link", "set", "lo", "up")
        for index, role in ((1, "ok"), (2, "bad")):
            name = f"{prefix}-{role}"
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
            outside, inside = f"hw{role}", "eth0"
            _ip("-n", server, "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", name)
            host = Host(name, f"10.77.{index}.2", f"fd00:77:{index}::2",
                        f"10.77.{index}.1", f"fd00:77:{index}::1")
            _ip("-n", server, "addr", "add", f"{host.server_ipv4}/24", "dev", outside)
            _ip("-n", server, "addr", "add", f"{host.server_ipv6}/64", "dev", outside, "nodad")
            _ip("-n", name, "addr", "add", f"{host.ipv4}/24", "dev", inside)
            _ip("-n", name, "addr", "add", f"{host.ipv6}/64", "dev", inside, "nodad")
            _ip("-n", server, "link", "set", outside, "up")
            _ip("-n", name, "link", "set", inside, "up")
            hosts.append(host)
    except BaseException:
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        raise
    return Lab(prefix, server, hosts[0], hosts[1])


@contextlib.contextmanager
def running_lab(prefix: str | None = None) -> Iterator[Lab]:
    lab = create_lab(prefix)
    try:
        lab.start_services()
        yield lab
    finally:
        lab.destroy()


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _probe(kind: socket.SocketKind, namespace: str, address: str, port: int, timeout: float,
           source: str | None = None) -> str:
    with netns.entered(namespace):
        sock = socket.socket(_family(address), kind)
    with sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        try:
            sock.connect((address, port))
            sock.sendall(b"ping")
            return "open" if sock.recv(16) == b"ping" else "closed"
        except (ConnectionRefusedError, ConnectionResetError):
            return "refused"
        except TimeoutError:
            return "timeout"


def probe_tcp(namespace: str, address: str, port: int, timeout: float = 1.0, source: str | None = None) -> str:
    """'open' (connected and echoed), 'timeout' (silently dropped) or 'refused' (reset);
    from source when given (one of the namespace's addresses)."""
    return _probe(socket.SOCK_STREAM, namespace, address, port, timeout, source)


def probe_udp(namespace: str, address: str, port: int, timeout: float = 1.0) -> str:
    """'open' (echo came back), 'timeout' or 'refused' (ICMP port unreachable)."""
    return _probe(socket.SOCK_DGRAM, namespace, address, port, timeout)


def connect(namespace: str, address: str, port: int, timeout: float = 1.0) -> socket.socket:
    """An established TCP connection from namespace, for tests that revoke it later."""
    with netns.entered(namespace):
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((address, port))
    return sock


def echo(sock: socket.socket, payload: bytes = b"ping") -> bool:
    """True when the peer echoed payload in time; False when the path is cut."""
    try:
        sock.sendall(payload)
        return sock.recv(len(payload)) == payload
    except (TimeoutError, ConnectionError):
        return False


JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNALD = "/lib/systemd/systemd-journald"


def journald_running() -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(JOURNAL_SOCKET)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class JournaldProcess:
    """journald started by hand, for machines without systemd as PID 1 (containers, CI).
    It owns only what it started: start() is a no-op while a journald listens."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.owned = not journald_running()

    def start(self) -> None:
        if journald_running():
            return
        os.makedirs("/run/systemd/journal", exist_ok=True)
        self.process = subprocess.Popen([JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):  # at most 10 s
            if journald_running():
                return
            if self.process.poll() is not None:
                break
            threading.Event().wait(0.05)
        self.stop()
        raise RuntimeError(f"{JOURNALD} did not start listening on {JOURNAL_SOCKET}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def journald() -> Iterator[JournaldProcess]:
    """Make sure journald is listening for the duration: on a systemd host it already
    is; elsewhere it is started by hand and stopped afterwards."""
    controller = JournaldProcess()
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()
