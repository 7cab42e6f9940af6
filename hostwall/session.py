"""The SSH session an operator runs hostwall from, found in /proc (an adapter: the only
reader of other processes' environments).

sshd gives the login shell SSH_CONNECTION ("client port server port"); sudo resets the
environment of the command it runs, but sudo itself, and the shell above it, still
hold it. So the process and its ancestors are searched, nearest first; reaching sshd
without finding it, the established connection on sshd's socket is the session. The caller can
set SSH_CONNECTION to anything in their own shell; that only misleads the guard that
protects that same caller, who may pass --allow-lockout anyway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from hostwall.lockout import SshSession, parse_ssh_connection

# Process trees are shallow (sshd, shell, sudo, hostwall); a cycle or a very deep tree
# ends the search rather than the command.
MAX_ANCESTORS = 64


def find_ssh_session(pid: int | None = None, proc: Path = Path("/proc"),
                     environ: Mapping[str, str] | None = None) -> SshSession | None:
    """The SSH session of this process (pid) or its nearest ancestor that has one."""
    pid = os.getpid() if pid is None else pid
    own = (os.environ if environ is None else environ).get("SSH_CONNECTION")
    if own:
        return parse_ssh_connection(own, f"the environment of pid {pid}", _netns(proc, pid))
    seen = {pid}
    for _ in range(MAX_ANCESTORS):
        parent = _parent(proc, pid)
        if parent is None or parent <= 0 or parent in seen:
            return None
        seen.add(parent)
        pid = parent
        value = _environ(proc, pid).get("SSH_CONNECTION")
        if value:
            return parse_ssh_connection(value, f"the environment of pid {pid} ({_comm(proc, pid)})",
                                        _netns(proc, pid))
        if _comm(proc, pid) == "sshd":
            # The shell below had no SSH_CONNECTION (unset, or a login that clears it):
            # the connection itself is the one sshd's socket holds.
            return _sshd_connection(proc, pid)
    return None


# /proc/net/tcp: "sl local rem st ... inode"; 01 is TCP_ESTABLISHED.
_ESTABLISHED = "01"


def _sshd_connection(proc: Path, pid: int) -> SshSession | None:
    """The established TCP connection among the sockets sshd (pid) holds."""
    inodes = set()
    try:
        for fd in (proc / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return None
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _ESTABLISHED or fields[9] not in inodes:
                continue
            try:
                (server, server_port), (client, client_port) = _endpoint(fields[1]), _endpoint(fields[2])
            except ValueError:
                continue
            found = parse_ssh_connection(f"{client} {client_port} {server} {server_port}",
                                         f"the socket of sshd (pid {pid})", _netns(proc, pid))
            if found is not None:
                return found
    return None


def _endpoint(text: str) -> tuple[str, int]:
    """An address:port of /proc/net/tcp{,6}: hex, each 32-bit word in host (little-endian) order."""
    address, _, port = text.partition(":")
    raw = bytes.fromhex(address)
    if len(raw) not in (4, 16):
        raise ValueError(text)
    ordered = raw if sys.byteorder == "big" else b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(ordered)), int(port, 16)


def _parent(proc: Path, pid: int) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _environ(proc: Path, pid: int) -> dict[str, str]:
    try:
        data = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    result = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            result[key.decode(errors="replace")] = value.decode(errors="replace")
    return result


def _comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def _netns(proc: Path, pid: int) -> int | None:
    try:
        return os.stat(proc / str(pid) / "ns" / "net").st_ino
    except OSError:
        return None


def target_netns(netns: str | None) -> int | None:
    """Inode of the network namespace hostwall changes: --netns NAME, or its own."""
    try:
        return os.stat(f"/run/netns/{netns}" if netns else "/proc/self/ns/net").st_ino
    except OSError:
        return None
