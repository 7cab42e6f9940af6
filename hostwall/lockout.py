"""Would a ruleset cut off the operator's own SSH session? Pure: the ruleset, the
session and the clock come in.

The chain drops every packet to a protected port from a source outside its sets
(loopback excepted), established connections included: the filter is stateless, so
a session that is not admitted stops the moment the table is loaded.
"""

from __future__ import annotations

import bisect
import ipaddress

from msgspec import Struct

from hostwall.errors import HostwallError
from hostwall.ruleset import Ruleset

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

class SshSession(Struct, frozen=True):
    client: IPAddress
    client_port: int
    server: IPAddress
    server_port: int
    found_in: str  # where SSH_CONNECTION was read, for the error message
    netns: int | None  # inode of the network namespace of that process, when readable

    def __str__(self) -> str:
        client = f"[{self.client}]" if self.client.version == 6 else str(self.client)
        return f"{client}:{self.client_port} -> port {self.server_port}"


def parse_ssh_connection(value: str, found_in: str = "", netns: int | None = None) -> SshSession | None:
    parts = value.split()
    if len(parts) != 4:
        return None
    try:
        client, server = (_address(parts[0]), _address(parts[2]))
        client_port, server_port = int(parts[1]), int(parts[3])
    except ValueError:
        return None
    if not (0 < client_port < 65536 and 0 < server_port < 65536):
        return None
    return SshSession(client, client_port, server, server_port, found_in, netns)


def _address(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.split("%", 1)[0])  # a link-local client carries its zone
    # sshd on a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; the packets are IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class WouldLockOut(HostwallError):
    """The change would drop the SSH session it was made from; nothing was loaded."""

    exit_code = 3

    def __init__(self, command: str, detail: str) -> None:
        self.detail = detail
        super().__init__(f"{command} refused: {detail}")


def blocking_service(ruleset: Ruleset, session: SshSession, now: float) -> str | None:
    """The name of the service whose chain would drop the session, or None."""
    client = session.client
    if client.is_loopback:
        return None
    value = int(client)
    for service in ruleset.services:
        if "tcp" not in service.protocols or not any(p.contains(session.server_port) for p in service.ports):
            continue
        intervals = service.intervals(client.version)
        if intervals.ordered:
            index = bisect.bisect_right(intervals, value, key=lambda i: i.first) - 1
            candidates = [intervals[index]] if index >= 0 else []
        else:
            candidates = list(intervals)
        if not any(i.contains(value) and i.expires > now for i in candidates):
            return service.name
    return None


def refuse_lockout(ruleset: Ruleset, session: SshSession | None, now: float, command: str) -> None:
    if session is None:
        return
    service = blocking_service(ruleset, session, now)
    if service is None:
        return
    family = "/32" if isinstance(session.client, ipaddress.IPv4Address) else "/128"
    raise WouldLockOut(command, (
        f"the new ruleset would drop your SSH session {session} (found in {session.found_in}): service "
        f"{service} admits no entry covering {session.client}. Add {session.client}{family} to {service}'s "
        "allow list, or pass --allow-lockout if you have another way in (a console); --confirm-within "
        "reverts it if you lose the session"))
