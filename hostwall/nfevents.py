"""Notice nf_tables changes as they happen: a subscription to the NFNLGRP_NFTABLES
multicast group of the namespace. Every committed ruleset change (anyone's) produces a
message; the agent then checks its own table cheaply instead of polling it often."""

from __future__ import annotations

import select
import socket

from hostwall import netns
from hostwall.errors import KernelUnavailable

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7


class RulesetEvents:
    def __init__(self, netns_name: str | None = None) -> None:
        try:
            with netns.entered(netns_name):
                self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise KernelUnavailable(f"cannot subscribe to nf_tables events: {exc}") from exc
        self._socket.bind((0, 0))
        self._socket.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        self._socket.setblocking(False)

    def fileno(self) -> int:
        return self._socket.fileno()

    def changed(self, timeout: float = 0.0) -> bool:
        """True when any ruleset change arrived since the last call (drains the queue).
        An overflow (ENOBUFS) also counts as a change: something happened, we missed what."""
        if not select.select([self._socket], [], [], timeout)[0]:
            return False
        seen = False
        while True:
            try:
                if not self._socket.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError:
                seen = True

    def close(self) -> None:
        self._socket.close()
