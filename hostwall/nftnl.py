"""Direct nf_tables netlink: cheap snapshots of the hostwall table and element deltas.

libnftables reads a whole set back into its cache before it changes one element
(0.6-0.8 s for one element of a 100k set, measured), while the kernel commits a small
element batch in milliseconds. So small changes are built here as one nfnetlink batch
of NEWSETELEM/DELSETELEM messages, and the table's comment, structure and generation
marker are read with a handful of netlink dumps that never touch set elements.

Both are plain attributes packed and parsed here. pyroute2's socket runs each request
through an asyncio loop and decodes every rule expression (14 ms per snapshot against
1-2 ms for this), and importing it costs 0.1 s, a tenth of a 100k full load: the unit
tests check these messages byte for byte against pyroute2's message classes."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from msgspec import Struct, field

from hostwall import netns
from hostwall.cidr import Interval, family_max
from hostwall.errors import KernelError, KernelRejected, KernelUnavailable, PermissionDenied
from hostwall.ruleset import GENERATION_SET, TABLE_NAME, Delta, TableObjects, hosts_set_name, timeout_seconds

NFPROTO_INET = 1
NETLINK_NETFILTER = 12
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE = 32
SEND_BUFFER = 16 << 20
SEND_BUFFER_SLACK = 64 << 10
NFNL_SUBSYS_NFTABLES = 10
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
# Message types from linux/netfilter/nf_tables.h.
NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET = 1, 4, 7, 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_GETOBJ = 12, 13, 14, 19
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

NLMSG_DONE = 3
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLA_TYPE_MASK = 0x3FFF
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
# Attribute numbers from linux/netfilter/nf_tables.h.
NFTA_TABLE_NAME, NFTA_TABLE_USERDATA = 1, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_USERDATA = 1, 2, 3, 13
NFT_SET_ANONYMOUS = 0x1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE = 1, 2, 3
NFTA_OBJ_DATA, NFTA_COUNTER_PACKETS = 4, 2
NFT_OBJECT_COUNTER = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 1, 1, 1
NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 3, 4, 6
NFTNL_UDATA_SET_ELEM_FLAGS = 1
NFTNL_UDATA_SET_COMMENT = 7
# What a chain, rule or set does; handles, use counts, element counts and counter values
# change without any edit, so they stay out of the fingerprint.
_CHAIN_ATTRS = (NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE)
_RULE_ATTRS = (NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS)
# name, flags, key type and length, data type and length, default timeout
_SET_ATTRS = (NFTA_SET_NAME, 3, 4, 5, 6, 7, 11)
SNAPSHOT_ATTEMPTS = 5
MAX_DUMP_READS = 100_000


class Snapshot(Struct, frozen=True):
    comment: str | None
    structure: str
    generation: int | None
    objects: TableObjects = field(default_factory=TableObjects)


class Contents(Struct, frozen=True):
    """The table's sets and named objects (attributes by number, as dumped) and each
    set's element lists (one NFTA_SET_ELEM_LIST_ELEMENTS payload per dump reply)."""

    sets: list[dict[int, bytes]]
    elements: dict[str, list[bytes]]
    objects: list[dict[int, bytes]]


_Read = TypeVar("_Read")


def _nft_type(message: int) -> int:
    return int(NFNL_SUBSYS_NFTABLES << 8) | message


class NetlinkTable:
    def __init__(self, netns_name: str | None = None, table: str = TABLE_NAME) -> None:
        self._netns = netns_name
        self._table = table
        self._sequence = 0
        try:
            with netns.entered(netns_name):
                # A netlink socket stays in the namespace it was created in.
                self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
                self._reader = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except PermissionError as exc:
            raise PermissionDenied("nf_tables netlink needs CAP_NET_ADMIN (run as root)") from exc
        except OSError as exc:
            raise KernelUnavailable(f"cannot open an nf_tables netlink socket: {exc}") from exc
        for sock in (self._socket, self._reader):
            sock.bind((0, 0))
            sock.settimeout(10)
        # An error acknowledgement then carries the refused message's header only, not the
        # whole message (up to 64 KiB of elements), so that errors fit the receive buffer.
        self._socket.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        # A batch goes out in one sendto(); the default send buffer (208 KiB) would cap it.
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)
        except OSError:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

    def close(self) -> None:
        # Releasing an nf_tables netlink socket shortly after a commit waits for the
        # kernel's deferred clean-up of that commit: 10-30 ms measured (6.18). A CLI
        # pays it at exit.
        self._socket.close()
        self._reader.close()

    # -- reading -----------------------------------------------------------------

    def _request(
        self, kind: int, attrs: list[tuple[int, bytes]], flags: int, *, strict: bool = True
    ) -> list[dict[int, bytes]]:
        """The attributes of every reply to one GET request (a dump when flags say so).
        strict: raise _Interrupted when the kernel marks a dump as cut by a change."""
        sequence = self._next_sequence()
        payload = _NFGENMSG.pack(NFPROTO_INET, 0, 0) + b"".join(_attribute(k, v) for k, v in attrs)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), _nft_type(kind), NLM_F_REQUEST | flags, sequence, 0)
        replies: list[dict[int, bytes]] = []
        try:
            self._reader.send(header + payload)
            for _ in range(MAX_DUMP_READS):
                buffer = self._reader.recv(1 << 20)
                for message_type, message_flags, data, start, end in _messages(buffer, sequence):
                    if message_type in (NLMSG_ERROR, NLMSG_DONE):
                        (code,) = struct.unpack_from("=i", data, start) if end - start >= 4 else (0,)
                        if code == -errno.ENOENT:
                            return []
                        if code == -errno.EPERM:
                            raise PermissionDenied("reading nf_tables needs CAP_NET_ADMIN (run as root)")
                        if code:
                            raise KernelError(f"nf_tables netlink request failed: {os.strerror(-code)}")
                        if message_type == NLMSG_DONE or not flags & NLM_F_DUMP:
                            return replies
                        continue
                    if message_flags & NLM_F_DUMP_INTR and strict:
                        raise _Interrupted
                    replies.append(attributes(data, start + _NFGENMSG.size, end))
                if not flags & NLM_F_DUMP and replies:
                    return replies
        except TimeoutError as exc:
            raise KernelError("nf_tables did not answer a netlink request in time") from exc
        except OSError as exc:
            raise KernelError(f"nf_tables netlink request failed: {exc}") from exc
        raise KernelError("nf_tables netlink dump did not end")

    def _dump(self, kind: int, attrs: list[tuple[int, bytes]], *, strict: bool = True) -> list[dict[int, bytes]]:
        return self._request(kind, attrs, NLM_F_DUMP, strict=strict)

    def _generation_id(self) -> int:
        replies = self._request(NFT_MSG_GETGEN, [], 0)
        value = replies[0].get(NFTA_GEN_ID) if replies else None
        if value is None or len(value) != 4:
            raise KernelError("nf_tables did not report its generation")
        return int.from_bytes(value, "big")

    def snapshot(self) -> Snapshot | None:
        """The full load's label (the generation set's comment), the structure fingerprint,
        the generation marker and the names a full load replaces, as of one
        nf_tables generation: read again when another tool's change lands while reading.

        On a ruleset that never holds still the last reading is taken as it is: at worst
        it reports drift that is not there (a full load) or misses a change, which the
        delta's guard on the generation marker still catches in the kernel.
        """
        return self._consistent(self._read_snapshot)

    def contents(self, *, elements: bool = True) -> Contents | None:
        """The attributes of the table's sets and named objects and (with elements) every
        set's element lists, as of one nf_tables generation as snapshot() reads them;
        None without the table. nftelements decodes them."""
        return self._consistent(lambda strict: self._read_contents(strict=strict, elements=elements))

    def _consistent(self, read: Callable[..., _Read | None]) -> _Read | None:
        reading: _Read | None = None
        for attempt in range(SNAPSHOT_ATTEMPTS):
            last = attempt == SNAPSHOT_ATTEMPTS - 1
            before = self._generation_id()
            try:
                reading = read(strict=not last)
            except _Interrupted:
                continue
            if last or self._generation_id() == before:
                break
        return reading

    def _read_contents(self, *, strict: bool = True, elements: bool = True) -> Contents | None:
        table = _c_string(self._table)
        if not any(t.get(NFTA_TABLE_NAME) == table for t in self._dump(NFT_MSG_GETTABLE, [], strict=strict)):
            return None
        sets = [item for item in self._dump(NFT_MSG_GETSET, [(NFTA_SET_TABLE, table)], strict=strict)
                if item.get(NFTA_SET_TABLE) == table]
        lists = {}
        for item in sets if elements else ():
            name = item.get(NFTA_SET_NAME, b"")
            replies = self._dump(NFT_MSG_GETSETELEM, [(NFTA_SET_ELEM_LIST_TABLE, table),
                                                      (NFTA_SET_ELEM_LIST_SET, name)], strict=strict)
            lists[attribute_text(item, NFTA_SET_NAME)] = [reply.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
                                                          for reply in replies]
        objects = [item for item in self._dump(NFT_MSG_GETOBJ, [(NFTA_OBJ_TABLE, table)], strict=strict)
                   if item.get(NFTA_OBJ_TABLE) == table]
        return Contents(sets, lists, objects)

    def _read_snapshot(self, *, strict: bool = True) -> Snapshot | None:
        table = _c_string(self._table)
        tables = [t for t in self._dump(NFT_MSG_GETTABLE, [], strict=strict) if t.get(NFTA_TABLE_NAME) == table]
        if not tables:
            return None
        comment = None
        structure: list[str] = []
        items: dict[str, list[dict[int, bytes]]] = {}
        # Chain dumps are not filtered by table on every kernel: filter here as well.
        dumps = ((NFT_MSG_GETCHAIN, NFTA_CHAIN_TABLE, "chain", _CHAIN_ATTRS),
                 (NFT_MSG_GETRULE, NFTA_RULE_TABLE, "rule", _RULE_ATTRS),
                 (NFT_MSG_GETSET, NFTA_SET_TABLE, "set", _SET_ATTRS))
        for kind, table_attr, label, wanted in dumps:
            items[label] = [item for item in self._dump(kind, [(table_attr, table)], strict=strict)
                            if item.get(table_attr) == table]
            structure.extend(label + " " + " ".join(item.get(a, b"").hex() for a in wanted) for item in items[label])
        named_sets = []
        for item in items["set"]:
            name = attribute_text(item, NFTA_SET_NAME)
            if name == GENERATION_SET:
                comment = _udata_comment(item.get(NFTA_SET_USERDATA, b""), NFTNL_UDATA_SET_COMMENT)
            if not int.from_bytes(item.get(NFTA_SET_FLAGS, b"\0\0\0\0"), "big") & NFT_SET_ANONYMOUS:
                named_sets.append(name)
        counters = [attribute_text(item, NFTA_OBJ_NAME)
                    for item in self._dump(NFT_MSG_GETOBJ, [(NFTA_OBJ_TABLE, table)], strict=strict)
                    if item.get(NFTA_OBJ_TABLE) == table
                    and int.from_bytes(item.get(NFTA_OBJ_TYPE, b"\0\0\0\0"), "big") == NFT_OBJECT_COUNTER]
        objects = TableObjects(tuple(attribute_text(item, NFTA_CHAIN_NAME) for item in items["chain"]),
                               tuple(named_sets), tuple(counters))
        digest = hashlib.sha256("\n".join(sorted(structure)).encode()).hexdigest()
        return Snapshot(comment=comment, structure=digest, generation=self._generation_marker(strict),
                        objects=objects)

    def _generation_marker(self, strict: bool = True) -> int | None:
        replies = self._dump(
            NFT_MSG_GETSETELEM,
            [(NFTA_SET_ELEM_LIST_TABLE, _c_string(self._table)), (NFTA_SET_ELEM_LIST_SET, _c_string(GENERATION_SET))],
            strict=strict,
        )
        values = []
        for reply in replies:
            elements = reply.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
            for element in repeated(elements, NFTA_LIST_ELEM):
                key = attributes(element, 0, len(element)).get(NFTA_SET_ELEM_KEY, b"")
                value = attributes(key, 0, len(key)).get(NFTA_DATA_VALUE, b"")
                if len(value) == struct.calcsize(_MARKER_FORMAT):
                    values.append(struct.unpack(_MARKER_FORMAT, value)[0])
        return values[0] if len(values) == 1 else None

    def set_keys(self, set_name: str) -> list[bytes]:
        """The raw key of every element of one of the table's sets (verify reads its
        observer's sets this way: libnftables would fetch every other set first)."""
        replies = self._dump(NFT_MSG_GETSETELEM, [(NFTA_SET_ELEM_LIST_TABLE, _c_string(self._table)),
                                                  (NFTA_SET_ELEM_LIST_SET, _c_string(set_name))])
        keys = []
        for reply in replies:
            for element in repeated(reply.get(NFTA_SET_ELEM_LIST_ELEMENTS, b""), NFTA_LIST_ELEM):
                key = attributes(element, 0, len(element)).get(NFTA_SET_ELEM_KEY, b"")
                keys.append(attributes(key, 0, len(key)).get(NFTA_DATA_VALUE, b""))
        return keys

    def counter_packets(self, name: str) -> int | None:
        """The packets of one of the table's named counters, or None without it."""
        table = _c_string(self._table)
        for item in self._dump(NFT_MSG_GETOBJ, [(NFTA_OBJ_TABLE, table)]):
            if item.get(NFTA_OBJ_TABLE) == table and item.get(NFTA_OBJ_NAME) == _c_string(name):
                data = item.get(NFTA_OBJ_DATA, b"")
                packets = attributes(data, 0, len(data)).get(NFTA_COUNTER_PACKETS)
                return int.from_bytes(packets, "big") if packets is not None else None
        return None

    # -- writing -----------------------------------------------------------------

    def apply_delta(self, delta: Delta, now: float) -> None:
        """Submit delta as one batch: all of it or, on any error, none of it.

        The batch first deletes the generation marker hostwall last wrote; if the
        kernel holds another one (a concurrent change), that delete fails and the
        kernel aborts the whole batch. Deletes precede adds so that an element whose
        timeout changed is removed and re-added within the same transaction.
        """
        messages = [self._batch_message(NFNL_MSG_BATCH_BEGIN)]
        messages += self._element_messages(NFT_MSG_DELSETELEM, GENERATION_SET,
                                           [_marker_element(delta.from_generation)])
        removals = [(change.set_name, change.remove) for change in delta.sets]
        additions = [(change.set_name, change.add) for change in delta.sets]
        for kind, changes, with_timeout in ((NFT_MSG_DELSETELEM, removals, False),
                                            (NFT_MSG_NEWSETELEM, additions, True)):
            for set_name, intervals in changes:
                # Single addresses live in the hash set beside the interval set (HOSTS_SUFFIX).
                hosts = [_host_element(i, now, with_timeout=with_timeout) for i in intervals if i.first == i.last]
                messages += self._element_messages(kind, hosts_set_name(set_name), hosts)
                elements = [e for i in intervals if i.first != i.last
                            for e in _interval_elements(i, now, with_timeout=with_timeout)]
                messages += self._element_messages(kind, set_name, elements)
        messages += self._element_messages(NFT_MSG_NEWSETELEM, GENERATION_SET,
                                           [_marker_element(delta.to_generation)])
        messages.append(self._batch_message(NFNL_MSG_BATCH_END))
        self._send_batch(messages)

    def submit_messages(self, messages: Sequence[tuple[int, int, bytes]]) -> None:
        """Send (type, flags, payload after the nfgenmsg header) nf_tables messages as one
        batch in one sendto(): all of it is committed or, on any error, none of it.

        Only the last message asks for an acknowledgement: nft does the same, since the
        kernel handles a batch inside sendto() and queues an error for each message it
        refused before sendto() returns. An acknowledgement for each of the hundreds of
        element messages of a large load could overflow the receive buffer.
        """
        batch = [self._batch_message(NFNL_MSG_BATCH_BEGIN)]
        header = _NFGENMSG.pack(NFPROTO_INET, 0, 0)
        for index, (kind, flags, payload) in enumerate(messages):
            sequence = self._next_sequence()
            ack = NLM_F_ACK if index == len(messages) - 1 else 0
            batch.append((sequence, _message(_nft_type(kind), NLM_F_REQUEST | ack | flags, sequence,
                                             header + payload)))
        batch.append(self._batch_message(NFNL_MSG_BATCH_END))
        last = batch[-2][0]
        data = b"".join(data for _, data in batch)
        errors: list[int] = []
        try:
            if len(data) + SEND_BUFFER_SLACK > SEND_BUFFER:
                # netlink refuses a message larger than the send buffer (EMSGSIZE), and a
                # batch is one message: a million entries are about 37 MB. nft sizes its
                # buffer to the batch the same way.
                self._socket.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + SEND_BUFFER_SLACK)
            with netns.entered(self._netns):
                self._socket.sendto(data, (0, 0))
            acknowledged = False
            while not acknowledged:
                buffer = self._socket.recv(1 << 20)
                for sequence, code in _acks(buffer):
                    if code:
                        errors.append(code)
                    if sequence == last:
                        acknowledged = True
                if errors and not acknowledged:
                    # The kernel reports every refused message, then the last one; wait only
                    # briefly for the rest of a batch that has failed anyway.
                    self._socket.settimeout(1)
        except TimeoutError as exc:
            if not errors:
                raise KernelError("nf_tables did not acknowledge the full load in time") from exc
        except OSError as exc:
            raise KernelError(f"nf_tables netlink batch failed: {exc}") from exc
        finally:
            self._socket.settimeout(10)
        if errors:
            code = -errors[0]
            reason = os.strerror(code)
            if code == errno.EPERM:
                raise PermissionDenied(f"the kernel refused the full load: {reason} (run as root)")
            raise KernelRejected(f"the kernel rejected the transaction: {reason}")

    def _next_sequence(self) -> int:
        self._sequence += 1
        return self._sequence

    def _batch_message(self, kind: int) -> tuple[int, bytes]:
        sequence = self._next_sequence()
        header = _NFGENMSG.pack(0, 0, socket.htons(NFNL_SUBSYS_NFTABLES))  # res_id is big-endian
        return sequence, _message(kind, NLM_F_REQUEST, sequence, header)

    def _element_messages(self, kind: int, set_name: str, elements: list[bytes]) -> list[tuple[int, bytes]]:
        result = []
        flags = NLM_F_REQUEST | NLM_F_ACK
        if kind == NFT_MSG_NEWSETELEM:
            flags |= NLM_F_CREATE | NLM_F_EXCL
        names = (_NFGENMSG.pack(NFPROTO_INET, 0, 0) + _attribute(NFTA_SET_ELEM_LIST_TABLE, _c_string(self._table))
                 + _attribute(NFTA_SET_ELEM_LIST_SET, _c_string(set_name)))
        for start in range(0, len(elements), ELEMENTS_PER_MESSAGE):
            # Each element's attribute type is its position, counted from 1, as libnftnl numbers them.
            chunk = elements[start:start + ELEMENTS_PER_MESSAGE]
            listed = _nested(NFTA_SET_ELEM_LIST_ELEMENTS,
                             b"".join(_nested(position, element) for position, element in enumerate(chunk, 1)))
            sequence = self._next_sequence()
            result.append((sequence, _message(_nft_type(kind), flags, sequence, names + listed)))
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


class _Interrupted(Exception):
    """A dump the kernel marked as interrupted by a concurrent change."""


def _c_string(text: str) -> bytes:
    return text.encode() + b"\0"


def _attribute(kind: int, value: bytes) -> bytes:
    length = _NLA.size + len(value)
    return _NLA.pack(length, kind) + value + b"\0" * (-length % 4)


def _nested(kind: int, content: bytes) -> bytes:
    # Without NLA_F_NESTED, as pyroute2 and older libnftnl send it: nf_tables parses
    # element lists either way, and this form is the one the namespace tests exercise.
    return _attribute(kind, content)


def _message(kind: int, flags: int, sequence: int, payload: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, sequence, 0) + payload


def attributes(data: bytes, offset: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The netlink attributes in data[offset:end], by type (the last one of a type wins)."""
    result: dict[int, bytes] = {}
    for kind, value in attribute_list(data, offset, end):
        result[kind] = value
    return result


def attribute_list(data: bytes, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each netlink attribute in data[offset:end], in order."""
    end = len(data) if end is None else end
    while offset + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < _NLA.size or offset + length > end:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size:offset + length]
        offset += (length + 3) & ~3


def repeated(data: bytes, kind: int) -> Iterator[bytes]:
    """The values of the attributes of one type in data (a nested list's items)."""
    return (value for found, value in attribute_list(data) if found == kind)


def _messages(buffer: bytes, sequence: int) -> Iterator[tuple[int, int, bytes, int, int]]:
    """(type, flags, buffer, payload start, end) of each reply to request sequence."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(buffer):
        length, kind, flags, found, _pid = _NLMSGHDR.unpack_from(buffer, offset)
        if length < _NLMSGHDR.size:
            return
        if found == sequence:
            yield kind, flags, buffer, offset + _NLMSGHDR.size, min(offset + length, len(buffer))
        offset += (length + 3) & ~3


def attribute_text(item: dict[int, bytes], attribute: int) -> str:
    """A string attribute of item without its NUL ("" when absent)."""
    return item.get(attribute, b"").rstrip(b"\0").decode(errors="replace")


def _udata_comment(udata: bytes, comment_type: int) -> str | None:
    """The comment in libnftnl's user data TLVs (type, length, value with its NUL)."""
    offset = 0
    while offset + 2 <= len(udata):
        kind, length = udata[offset], udata[offset + 1]
        value = udata[offset + 2:offset + 2 + length]
        if kind == comment_type:
            return value.rstrip(b"\0").decode(errors="replace")
        offset += 2 + length
    return None


def _address_bytes(family: int, value: int) -> bytes:
    return value.to_bytes(4 if family == 4 else 16, "big")


def _element(key: bytes, *attributes: bytes) -> bytes:
    """One element's attributes: the key, then the given NFTA_SET_ELEM_* attributes."""
    return _nested(NFTA_SET_ELEM_KEY, _attribute(NFTA_DATA_VALUE, key)) + b"".join(attributes)


def _marker_element(generation: int) -> bytes:
    return _element(struct.pack(_MARKER_FORMAT, generation))


# libnftnl's user data TLV (type, length, value) that flags an open-ended interval.
_INTERVAL_OPEN = _attribute(NFTA_SET_ELEM_USERDATA, bytes((NFTNL_UDATA_SET_ELEM_FLAGS, 4))
                            + struct.pack("=I", NFTNL_SET_ELEM_F_INTERVAL_OPEN))
_INTERVAL_END = _attribute(NFTA_SET_ELEM_FLAGS, struct.pack(">I", NFT_SET_ELEM_INTERVAL_END))


def _timeout(interval: Interval, now: float, with_timeout: bool) -> bytes:
    if with_timeout and interval.expires != float("inf"):
        return _attribute(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", timeout_seconds(interval, now) * 1000))
    return b""


def _host_element(interval: Interval, now: float, *, with_timeout: bool) -> bytes:
    """A single address in the hash set beside the interval set (see HOSTS_SUFFIX)."""
    return _element(_address_bytes(interval.family, interval.first), _timeout(interval, now, with_timeout))


def _interval_elements(interval: Interval, now: float, *, with_timeout: bool) -> list[bytes]:
    """The kernel form of one interval: a start element and an end element one past it."""
    timeout = _timeout(interval, now, with_timeout)
    start = _address_bytes(interval.family, interval.first)
    if interval.last == family_max(interval.family):
        return [_element(start, timeout, _INTERVAL_OPEN)]
    return [_element(start, timeout), _element(_address_bytes(interval.family, interval.last + 1), _INTERVAL_END)]
