"""Direct nf_tables netlink: cheap snapshots of the hostwall table and element deltas.

libnftables reads a whole set back into its cache before it changes one element
(0.6-0.8 s for one element of a 100k set, measured), while the kernel commits a small
element batch in milliseconds. So small changes are built here as one nfnetlink batch
of NEWSETELEM/DELSETELEM messages on pyroute2's message classes, and the table's
comment, structure and generation marker are read with a handful of netlink dumps
that never touch set elements. This is the only module that imports pyroute2.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink import nftsocket as nft

from hostwall import netns
from hostwall.cidr import Interval, family_max
from hostwall.errors import KernelError, KernelRejected, KernelUnavailable, PermissionDenied
from hostwall.ruleset import GENERATION_SET, TABLE_NAME, Delta, timeout_seconds

NFPROTO_INET = 1
NETLINK_NETFILTER = 12
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NLMSG_ERROR = 2
NFT_SET_ELEM_INTERVAL_END = 1
# libnftnl's NFTNL_SET_ELEM_F_INTERVAL_OPEN: a range reaching the family's last address
# has no end element; nft marks the start element instead and so do we.
NFTNL_SET_ELEM_F_INTERVAL_OPEN = 1
ELEMENTS_PER_MESSAGE = 512
_NLMSGHDR = struct.Struct("=IHHII")
_MARKER_FORMAT = "=I"  # meta mark is host byte order


@dataclass(frozen=True)
class Snapshot:
    comment: str | None
    structure: str
    generation: int | None


def _nft_type(message: int) -> int:
    return int(NFNL_SUBSYS_NFTABLES << 8) | message


class NetlinkTable:
    def __init__(self, netns_name: str | None = None, table: str = TABLE_NAME) -> None:
        self._netns = netns_name
        self._table = table
        self._sequence = 0
        try:
            with netns.entered(netns_name):
                self._dumper = nft.NFTSocket(nfgen_family=NFPROTO_INET)
                self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except PermissionError as exc:
            raise PermissionDenied("nf_tables netlink needs CAP_NET_ADMIN (run as root)") from exc
        except OSError as exc:
            raise KernelUnavailable(f"cannot open an nf_tables netlink socket: {exc}") from exc
        self._socket.bind((0, 0))
        self._socket.settimeout(10)
        # A batch goes out in one sendto(); the default send buffer (208 KiB) would cap it.
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, 32, 16 << 20)  # SO_SNDBUFFORCE
        except OSError:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)

    def close(self) -> None:
        self._socket.close()
        self._dumper.close()

    # -- reading -----------------------------------------------------------------

    def _dump(self, message_type: int, message_class: type[Any], attrs: list[list[Any]]) -> list[Any]:
        message = message_class()
        message["attrs"] = attrs
        try:
            return list(self._dumper.request_get(message, message_type))
        except Exception as exc:
            code = getattr(exc, "code", None)
            if code == errno.ENOENT:
                return []
            if code == errno.EPERM:
                raise PermissionDenied("reading nf_tables needs CAP_NET_ADMIN (run as root)") from exc
            raise KernelError(f"nf_tables netlink dump failed: {exc}") from exc

    def snapshot(self) -> Snapshot | None:
        tables = [t for t in self._dump(nft.NFT_MSG_GETTABLE, nft.nft_table_msg, [])
                  if t.get_attr("NFTA_TABLE_NAME") == self._table and t["nfgen_family"] == NFPROTO_INET]
        if not tables:
            return None
        comment = tables[0].get_attr("NFTA_TABLE_USERDATA")
        structure: list[Any] = []
        # Only attributes that describe what the table does; handles, use counts and
        # element counts change without any edit. (Some of pyroute2's decoders for
        # other attributes are not safe to call on every kernel's output.)
        for chain in self._dump(nft.NFT_MSG_GETCHAIN, nft.nft_chain_msg, [["NFTA_CHAIN_TABLE", self._table]]):
            structure.append(["chain", _attrs(chain, _CHAIN_ATTRS)])
        for rule in self._dump(nft.NFT_MSG_GETRULE, nft.nft_rule_msg, [["NFTA_RULE_TABLE", self._table]]):
            structure.append(["rule", _attrs(rule, _RULE_ATTRS)])
        for item in self._dump(nft.NFT_MSG_GETSET, nft.nft_set_msg, [["NFTA_SET_TABLE", self._table]]):
            structure.append(["set", _attrs(item, _SET_ATTRS)])
        canonical = sorted(json.dumps(item, separators=(",", ":")) for item in structure)
        digest = hashlib.sha256("\n".join(canonical).encode()).hexdigest()
        return Snapshot(
            comment=comment if isinstance(comment, str) else None,
            structure=digest,
            generation=self._generation_marker(),
        )

    def _generation_marker(self) -> int | None:
        replies = self._dump(
            nft.NFT_MSG_GETSETELEM, nft.nft_set_elem_list_msg,
            [["NFTA_SET_ELEM_LIST_TABLE", self._table], ["NFTA_SET_ELEM_LIST_SET", GENERATION_SET]],
        )
        values = []
        for reply in replies:
            for element in reply.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or []:
                key = element.get_attr("NFTA_SET_ELEM_KEY").get_attr("NFTA_DATA_VALUE")
                values.append(struct.unpack(_MARKER_FORMAT, key)[0])
        return values[0] if len(values) == 1 else None

    # -- writing -----------------------------------------------------------------

    def apply_delta(self, delta: Delta, now: float) -> None:
        """Submit delta as one batch: all of it or, on any error, none of it.

        The batch first deletes the generation marker hostwall last wrote; if the
        kernel holds another one (a concurrent change), that delete fails and the
        kernel aborts the whole batch. Deletes precede adds so that an element whose
        timeout changed is removed and re-added within the same transaction.
        """
        messages = [self._batch_message(NFNL_MSG_BATCH_BEGIN)]
        messages += self._element_messages(nft.NFT_MSG_DELSETELEM, GENERATION_SET,
                                           [_marker_element(delta.from_generation)])
        for set_delta in delta.sets:
            elements = [e for i in set_delta.remove for e in _interval_elements(i, now, with_timeout=False)]
            messages += self._element_messages(nft.NFT_MSG_DELSETELEM, set_delta.set_name, elements)
        for set_delta in delta.sets:
            elements = [e for i in set_delta.add for e in _interval_elements(i, now, with_timeout=True)]
            messages += self._element_messages(nft.NFT_MSG_NEWSETELEM, set_delta.set_name, elements)
        messages += self._element_messages(nft.NFT_MSG_NEWSETELEM, GENERATION_SET,
                                           [_marker_element(delta.to_generation)])
        messages.append(self._batch_message(NFNL_MSG_BATCH_END))
        self._send_batch(messages)

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _batch_message(self, kind: int) -> tuple[int, bytes]:
        message = nfgen_msg()
        message["res_id"] = NFNL_SUBSYS_NFTABLES
        message["header"]["type"] = kind
        message["header"]["flags"] = NLM_F_REQUEST
        sequence = self._next_sequence()
        message["header"]["sequence_number"] = sequence
        message.encode()
        return sequence, bytes(message.data)

    def _element_messages(self, kind: int, set_name: str, elements: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
        result = []
        flags = NLM_F_REQUEST | NLM_F_ACK
        if kind == nft.NFT_MSG_NEWSETELEM:
            flags |= NLM_F_CREATE | NLM_F_EXCL
        for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):
            message = nft.nft_set_elem_list_msg()
            message["nfgen_family"] = NFPROTO_INET
            message["attrs"] = [
                ["NFTA_SET_ELEM_LIST_TABLE", self._table],
                ["NFTA_SET_ELEM_LIST_SET", set_name],
                ["NFTA_SET_ELEM_LIST_ELEMENTS", elements[start:start + ELEMENTS_PER_MESSAGE]],
            ]
            message["header"]["type"] = _nft_type(kind)
            message["header"]["flags"] = flags
            sequence = self._next_sequence()
            message["header"]["sequence_number"] = sequence
            message.encode()
            result.append((sequence, bytes(message.data)))
        return result

    def _send_batch(self, messages: list[tuple[int, bytes]]) -> None:
        expected = {sequence for sequence, data in messages[1:-1]}
        try:
            with netns.entered(self._netns):
                self._socket.sendto(b"".join(data for _, data in messages), (0, 0))
            errors = []
            while expected:
                buffer = self._socket.recv(1 << 20)
                for sequence, code in _acks(buffer):
                    expected.discard(sequence)
                    if code:
                        errors.append(code)
                if errors:
                    # The kernel aborts the batch at the first error; later messages get no ack.
                    break
        except TimeoutError as exc:
            raise KernelError("nf_tables did not acknowledge the element batch in time") from exc
        except OSError as exc:
            raise KernelError(f"nf_tables netlink batch failed: {exc}") from exc
        if errors:
            code = -errors[0]
            reason = os.strerror(code)
            if code == errno.EPERM:
                raise PermissionDenied(f"the kernel refused the element batch: {reason} (run as root)")
            raise KernelRejected(f"the kernel rejected the element batch: {reason}")


def _acks(buffer: bytes) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(buffer):
        length, kind, _flags, sequence, _pid = _NLMSGHDR.unpack_from(buffer, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", buffer, offset + _NLMSGHDR.size)
            yield sequence, code
        offset += (length + 3) & ~3


_CHAIN_ATTRS = ("NFTA_CHAIN_NAME", "NFTA_CHAIN_HOOK", "NFTA_CHAIN_POLICY", "NFTA_CHAIN_TYPE")
_RULE_ATTRS = ("NFTA_RULE_CHAIN", "NFTA_RULE_EXPRESSIONS")
_SET_ATTRS = ("NFTA_SET_NAME", "NFTA_SET_FLAGS", "NFTA_SET_KEY_TYPE", "NFTA_SET_KEY_LEN",
              "NFTA_SET_DATA_TYPE", "NFTA_SET_DATA_LEN", "NFTA_SET_TIMEOUT")


def _attrs(message: Any, names: tuple[str, ...]) -> list[Any]:
    return [[name, _plain(message.get_attr(name))] for name in names]


def _plain(value: Any) -> Any:
    """Decoded netlink attributes as JSON-able data (pyroute2's own repr can explode)."""
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, frozenset | set):
        return sorted(str(v) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    attrs = value.get("attrs") if hasattr(value, "get") else None
    if attrs is not None:
        return [[name, _plain(v)] for name, v in attrs]
    return str(type(value).__name__)


def _address_bytes(family: int, value: int) -> bytes:
    return value.to_bytes(4 if family == 4 else 16, "big")


def _marker_element(generation: int) -> dict[str, Any]:
    return {"attrs": [["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE",
                                                       struct.pack(_MARKER_FORMAT, generation)]]}]]}


def _interval_elements(interval: Interval, now: float, *, with_timeout: bool) -> list[dict[str, Any]]:
    """The kernel form of one interval: a start element and an end element one past it."""
    start: list[list[Any]] = [
        ["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", _address_bytes(interval.family, interval.first)]]}]
    ]
    if with_timeout and interval.expires != float("inf"):
        start.append(["NFTA_SET_ELEM_TIMEOUT", timeout_seconds(interval, now) * 1000])
    if interval.last == family_max(interval.family):
        start.append(["NFTA_SET_ELEM_USERDATA",
                      [["NFTNL_UDATA_SET_ELEM_FLAGS", struct.pack("=I", NFTNL_SET_ELEM_F_INTERVAL_OPEN)]]])
        return [{"attrs": start}]
    end = [
        ["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", _address_bytes(interval.family, interval.last + 1)]]}],
        ["NFTA_SET_ELEM_FLAGS", frozenset({NFT_SET_ELEM_INTERVAL_END})],
    ]
    return [{"attrs": start}, {"attrs": end}]

