"""Helpers shared by the namespace tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hostwall import netns
from hostwall.lab import JournaldProcess, Lab, probe_tcp, probe_udp
from hostwall.nft import NftBackend
from hostwall.nftload import NFT_MSG_DELSET, Message

# A denied probe costs its whole timeout, so it is short; an allowed one returns as
# soon as the echo comes back, so a generous timeout costs nothing and absorbs load.
DENY_TIMEOUT = 1.0
OPEN_TIMEOUT = 3.0
COMMAND_TIMEOUT = 60

# Accepted by nft's parser, refused by the kernel while it processes the batch: a set
# that holds at most one element gets two, and nf_tables answers ENFILE to the NEWSETELEM
# message (strace shows NLMSG_ERROR error=-ENFILE from the kernel). The whole batch,
# including the delete and re-creation of the hostwall table before it, is aborted.
KERNEL_ONLY_FAILURE_MESSAGE = Message(
    NFT_MSG_DELSET, 0, b"\x0d\x00\x01\x00hostwall\x00\x00\x00\x00" + b"\x13\x00\x02\x00kernel_rejects\x00\x00")
KERNEL_ONLY_FAILURE = (
    "add set inet hostwall kernel_rejects { type ipv4_addr; size 1; }\n"
    "add element inet hostwall kernel_rejects { 192.0.2.1, 192.0.2.2 }\n"
)
KERNEL_ENFILE = "Too many open files in system"  # strerror(ENFILE)

# (client role, IP version, "port/proto") -> "open" | "timeout" | "refused"
Expected = dict[tuple[str, int, str], str]

# What the conftest fixtures hand to tests.
Cli = Callable[..., "subprocess.CompletedProcess[str]"]  # hostwall(*args)
CliJson = Callable[..., tuple[int, Any]]  # cli_json(*args) -> (exit code, --json document)
Nft = Callable[..., "subprocess.CompletedProcess[str]"]  # nft(*args) in the server namespace
PolicyWriter = Callable[..., Path]  # write_policy({service: [cidr, ...]}, action=..., ports=...)


class RejectingBackend(NftBackend):
    """The real backend, with a command appended that only the kernel refuses."""

    def submit(self, transaction: str) -> None:
        super().submit(transaction + KERNEL_ONLY_FAILURE)

    def _submit_messages(self, messages: list[Message]) -> None:
        # The netlink full load: a delete of a set that does not exist, which only the
        # kernel can refuse, after everything else.
        super()._submit_messages([*messages, KERNEL_ONLY_FAILURE_MESSAGE])


def run_nft(namespace: str, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """nft inside a namespace the test created; never called for the root namespace."""
    result = subprocess.run(["ip", "netns", "exec", namespace, "nft", *args], input=stdin,
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"nft {' '.join(args)} in {namespace} failed: {result.stderr}")
    return result


def output(result: subprocess.CompletedProcess[str]) -> Any:
    """The --json document of a CLI run; the failure message carries stdout and stderr."""
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON from {result.args[9:]}: rc={result.returncode}\n"
                    f"stdout: {result.stdout}\nstderr: {result.stderr}")


def _probe(lab: Lab, role: str, family: int, target: str, timeout: float) -> str:
    host = lab.allowed if role == "allowed" else lab.denied
    address = host.server_ipv4 if family == 4 else host.server_ipv6
    port, _, protocol = target.partition("/")
    probe = probe_udp if protocol == "udp" else probe_tcp
    return probe(host.namespace, address, int(port), timeout)


def reach(lab: Lab, expected: Expected) -> Expected:
    """Probe every key of expected at once and return what actually happened.

    A test asserts ``reach(lab, expected) == expected`` so that a failure shows every
    difference. The probes run in parallel (setns() moves only the probing thread), so
    a test with many denied probes still takes about one DENY_TIMEOUT.
    """
    with ThreadPoolExecutor(max_workers=len(expected)) as pool:
        futures = {
            key: pool.submit(_probe, lab, *key, DENY_TIMEOUT if want == "timeout" else OPEN_TIMEOUT)
            for key, want in expected.items()
        }
        return {key: future.result() for key, future in futures.items()}


def matrix(results: dict[str, str], families: tuple[int, ...], targets: tuple[str, ...]) -> Expected:
    """results maps a client role ("allowed", "denied") to the result for every target."""
    return {(role, family, target): want
            for role, want in results.items() for family in families for target in targets}


def probe_tcp_scoped(namespace: str, address: str, port: int, ifindex: int,
                     timeout: float) -> tuple[str, str | None]:
    """A TCP probe to a link-local address: (result, local source address when connected)."""
    with netns.entered(namespace):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port, 0, ifindex))
            source = str(sock.getsockname()[0])
            sock.sendall(b"ping")
            return ("open" if sock.recv(16) == b"ping" else "closed"), source
        except (ConnectionRefusedError, ConnectionResetError):
            return "refused", None
        except TimeoutError:
            return "timeout", None


def probe_udp_large(namespace: str, address: str, port: int, size: int, timeout: float) -> str:
    """A UDP datagram larger than the link MTU, so it travels as IP fragments."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.send(b"f" * size)
        try:
            return "open" if sock.recv(size + 1) == b"f" * size else "closed"
        except TimeoutError:
            return "timeout"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(namespace: str, address: str, timeout: float) -> bool:
    """One ICMP/ICMPv6 echo over a raw socket (the image has no ping binary)."""
    v6 = ":" in address
    family, protocol = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6
                        else (socket.AF_INET, socket.IPPROTO_ICMP))
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", request, 0, 0, ident, 1) + b"hostwall"
    # The kernel fills in the ICMPv6 checksum of raw sockets itself (RFC 3542).
    packet = header if v6 else header[:2] + _checksum(header).to_bytes(2, "big") + header[4:]
    with netns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_RAW, protocol)
    with sock:
        sock.sendto(packet, (address, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                return False
            body = data if v6 else data[(data[0] & 0x0F) * 4:]  # IPv4 raw reads include the IP header
            kind, _, _, got_ident, _ = struct.unpack("!BBHHH", body[:8])
            if kind == reply and got_ident == ident:
                return True
        return False


class Journald(JournaldProcess):
    """journald for the test session; a start failure fails the test."""

    def start(self) -> None:
        try:
            super().start()
        except RuntimeError as exc:
            pytest.fail(str(exc))


def journal_records(namespace: str, *matches: str) -> list[dict[str, Any]]:
    """The journal's records about one lab namespace, as journalctl -o json gives them."""
    result = subprocess.run(["journalctl", "-o", "json", "--no-pager", f"HOSTWALL_NETNS={namespace}", *matches],
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wait_for_records(namespace: str, predicate: Callable[[list[dict[str, Any]]], bool],
                     *matches: str, seconds: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        records = journal_records(namespace, *matches)
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def send_udp(namespace: str, address: str, port: int, count: int) -> None:
    """count datagrams as fast as the socket takes them (bounded by count)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with netns.entered(namespace):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            sock.sendto(b"x", (address, port))


def ip_json(*args: str) -> Any:
    result = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True, timeout=10)
    return json.loads(result.stdout)


def link_local_address(namespace: str, device: str, deadline: float) -> str:
    """The device's fe80:: address once duplicate address detection has finished."""
    while True:
        addresses = [
            info for entry in ip_json("-n", namespace, "-6", "addr", "show", "dev", device)
            for info in entry.get("addr_info", []) if info.get("scope") == "link"
        ]
        ready = [info["local"] for info in addresses if not info.get("tentative")]
        if ready:
            return str(ready[0])
        if time.monotonic() > deadline:
            pytest.fail(f"no usable link-local address on {device} in {namespace}: {addresses}")
        time.sleep(0.1)


def counters(namespace: str) -> dict[str, int]:
    """Packets counted by each of the hostwall table's named counters in namespace."""
    listing = json.loads(run_nft(namespace, "-j", "list", "counters", "table", "inet", "hostwall").stdout)
    return {item["counter"]["name"]: int(item["counter"]["packets"]) for item in listing["nftables"]
            if "counter" in item}


def tcp_counters(namespace: str) -> dict[str, int]:
    """The namespace's TCP counters (/proc/net/snmp Tcp:, /proc/net/netstat TcpExt:)."""
    counted: dict[str, int] = {}
    for source in ("/proc/net/snmp", "/proc/net/netstat"):
        text = subprocess.run(["ip", "netns", "exec", namespace, "cat", source], capture_output=True,
                              text=True, timeout=30, check=True).stdout.splitlines()
        for names, values in zip(text[::2], text[1::2], strict=True):
            if names.startswith(("Tcp:", "TcpExt:")):
                counted.update(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
    return counted


class Harness:
    """Starts `hostwall agent` the way systemd would and collects what it notifies.

    Like systemd, it reads the notification socket all the time: an AF_UNIX datagram
    queue holds only a few messages, and a full one would block the agent's sd_notify.
    """

    def __init__(self, lab: Lab, policy_dir: Path, state_dir: Path, tmp: Path, *args: str,
                 watchdog_usec: int = 1_000_000, wrapper: tuple[str, ...] = ()) -> None:
        """wrapper: a command that execs the agent's command line given after it."""
        self.socket_path = str(tmp / f"notify-{time.monotonic_ns()}")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.socket_path)
        self.socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTWALL_", "NOTIFY_"))}
        environment.update(NOTIFY_SOCKET=self.socket_path, WATCHDOG_USEC=str(watchdog_usec))
        command = [*wrapper, sys.executable, "-m", "hostwall", "--netns", lab.server,
                   "--policy-dir", str(policy_dir), "--state-dir", str(state_dir), "agent", *args]
        self.started = time.monotonic()  # before the agent exists: bounds what it can have sent
        self.process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                message = self.socket.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), message))

    def wait_for(self, text: str, seconds: float = 15.0, occurrence: int = 1) -> float:
        """Time (monotonic) the occurrence-th notification containing text arrived."""
        deadline = time.monotonic() + seconds
        while True:
            seen = [stamp for stamp, message in list(self.messages) if text in message]
            if len(seen) >= occurrence:
                return seen[occurrence - 1]
            if time.monotonic() > deadline or self.process.poll() is not None:
                break
            time.sleep(0.02)
        stderr = ""
        if self.process.poll() is not None and self.process.stderr:
            stderr = self.process.stderr.read()
        pytest.fail(f"no {text!r} notification; got {[m for _, m in self.messages]}; agent stderr: {stderr}")

    def collect(self, seconds: float) -> None:
        """Let notifications arrive for seconds (the reader thread stores them)."""
        time.sleep(seconds + 0.15)

    def count(self, text: str) -> int:
        return sum(text in m for _, m in list(self.messages))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=COMMAND_TIMEOUT)
        return self.process.returncode

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=COMMAND_TIMEOUT)
        # A failed test never called stop(): close the pipes here, or their finalizers
        # warn in whichever later test the garbage collector happens to run.
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        self._closing.set()
        self._reader.join(timeout=5)
        self.socket.close()
