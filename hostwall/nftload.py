"""A full load as nf_tables netlink messages, built from the ruleset without nft's parser.

libnftables parses the rendered text again, resolves it against a cache it reads from
the kernel, and only then sends messages: about 0.2 s of a 100k load before the kernel
sees a byte (README, "Performance"). The messages here are the ones `nft -f` sends for
the text render_clearing() and render_full_load() produce, in the same order and with
the same attributes (`nft --debug=mnl -f` shows them;
tests/netns/test_netns_fast_load.py compares them byte for byte, and `nft list table`
after either load for random policies), so the kernel ends up holding what nft would
have loaded.

Only the shapes hostwall emits are encoded. A ruleset with per-element counters
(``entry_counters``) needs set expressions and goes through libnftables instead:
``encodable`` says which path a ruleset takes.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator

from msgspec import Struct

from hostwall.cidr import IntervalSet, family_max
from hostwall.ruleset import (
    GENERATION_SET,
    INGRESS_CHAIN,
    INGRESS_PRIORITY,
    LOG_PREFIX,
    SPOOFED_SUFFIX,
    TABLE_NAME,
    Ruleset,
    ServiceRules,
    TableObjects,
    hosts_set_name,
    table_comment,
    timeout_seconds,
)

NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NLM_F_CREATE, NLM_F_APPEND = 0x400, 0x800
NLA_F_NESTED = 0x8000
# Message types from linux/netfilter/nf_tables.h.
NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN = 0, 3, 5
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFT_MSG_NEWSET, NFT_MSG_DELSET, NFT_MSG_NEWSETELEM = 9, 11, 12
NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ = 18, 20
# Attribute numbers and constants from linux/netfilter/nf_tables.h.
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 1, 3, 4, 5, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NF_INET_PRE_ROUTING, NF_ACCEPT = 0, 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN = 1, 2, 3, 4, 5
NFTA_SET_ID, NFTA_SET_USERDATA = 10, 13
NFT_SET_INTERVAL, NFT_SET_TIMEOUT = 0x4, 0x10
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET_ID = 1, 2, 3, 4
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 1, 3, 4, 6
NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2, 1, 2
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER, NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 1, 2
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_JUMP, NFT_RETURN = -3, -5
NFT_META_IIF, NFT_META_NFPROTO, NFT_META_L4PROTO = 4, 15, 16
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ, NFT_CMP_LTE, NFT_CMP_GTE = 0, 1, 3, 5
NFTA_FIB_F_SADDR, NFTA_FIB_F_DADDR, NFTA_FIB_F_IIF, NFTA_FIB_F_PRESENT = 0x1, 0x2, 0x8, 0x20
NFT_FIB_RESULT_OIF, NFT_FIB_RESULT_ADDRTYPE = 1, 3
RTN_LOCAL = 2
NFT_REJECT_TCP_RST, NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_PORT_UNREACH = 1, 2, 1
# nft's set user data (libnftnl's NFTNL_UDATA_SET_*): key byte order, auto-merge, comment.
NFTNL_UDATA_SET_KEYBYTEORDER, NFTNL_UDATA_SET_MERGE_ELEMENTS, NFTNL_UDATA_SET_COMMENT = 0, 2, 7
BYTEORDER_HOST_ENDIAN, BYTEORDER_BIG_ENDIAN = 1, 2
# nft's data types (datatype.h) of the set keys.
TYPE_IPADDR, TYPE_IP6ADDR, TYPE_MARK = 7, 8, 19
NFTNL_UDATA_SET_ELEM_FLAGS, NFTNL_SET_ELEM_F_INTERVAL_OPEN = 1, 1
IPPROTO = {"tcp": 6, "udp": 17}
LOOPBACK_IFINDEX = 1  # "lo" in every network namespace
# One message's element list is a netlink attribute, so at most 64 KiB: 1024 of the
# largest element (an IPv6 interval start with a timeout and the open flag, 52 bytes).
ELEMENTS_PER_MESSAGE = 1024

_NLA = struct.Struct("=HH")


class Message(Struct, frozen=True):
    """One nf_tables message of a batch: its type (without the subsystem), netlink
    flags beyond NLM_F_REQUEST, and its payload after the nfgenmsg header."""

    kind: int
    flags: int
    payload: bytes


def encodable(ruleset: Ruleset) -> bool:
    """Whether full_load_messages covers the ruleset (see the module's docstring)."""
    return not any(service.entry_counters for service in ruleset.services) and all(
        protocol in IPPROTO for service in ruleset.services for protocol in service.protocols)


def full_load_messages(ruleset: Ruleset, generation: int, now: float, existing: TableObjects) -> list[Message]:
    """The batch of render_clearing(existing) + render_full_load(ruleset, generation, now)."""
    table = _string(NFTA_TABLE_NAME, TABLE_NAME)
    messages = [Message(NFT_MSG_NEWTABLE, NLM_F_CREATE, table + _u32(NFTA_TABLE_FLAGS, 0)),
                _base_chain(), Message(NFT_MSG_DELRULE, 0, table)]
    messages += [Message(NFT_MSG_DELCHAIN, 0, table + _string(NFTA_CHAIN_NAME, name))
                 for name in existing.chains if name != INGRESS_CHAIN]
    messages += [Message(NFT_MSG_DELSET, 0, table + _string(NFTA_SET_NAME, name)) for name in existing.sets]
    messages += [Message(NFT_MSG_DELOBJ, 0, table + _string(NFTA_OBJ_NAME, name)
                         + _u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER) + _nest(NFTA_OBJ_DATA, b""))
                 for name in existing.counters]
    messages += [Message(NFT_MSG_NEWTABLE, NLM_F_CREATE, table + _u32(NFTA_TABLE_FLAGS, 0)), _base_chain()]
    messages += [Message(NFT_MSG_NEWCHAIN, NLM_F_CREATE, table + _string(NFTA_CHAIN_NAME, service.chain))
                 for service in ruleset.services]
    for service in ruleset.services:
        for counter in (service.accepted_counter, service.dropped_counter):
            data = _nest(NFTA_OBJ_DATA, _u64(NFTA_COUNTER_BYTES, 0) + _u64(NFTA_COUNTER_PACKETS, 0))
            messages.append(Message(NFT_MSG_NEWOBJ, NLM_F_CREATE, table + _string(NFTA_OBJ_NAME, counter)
                                    + _u32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER) + data))
    set_ids: dict[str, int] = {}
    comment = table_comment(generation, ruleset.digest)
    marker = _listed([_element(key=struct.pack("=I", generation))])
    messages += _set_messages(set_ids, GENERATION_SET, TYPE_MARK, 4, 0,
                              _udata(NFTNL_UDATA_SET_KEYBYTEORDER, struct.pack("=I", BYTEORDER_HOST_ENDIAN))
                              + _udata(NFTNL_UDATA_SET_COMMENT, comment.encode() + b"\0"), [marker])
    for service in ruleset.services:
        for family in (4, 6):
            messages += _service_sets(set_ids, service, family, now)
    messages += _rules(ruleset, set_ids)
    return messages


def _base_chain() -> Message:
    hook = _nest(NFTA_CHAIN_HOOK, _u32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING)
                 + _u32(NFTA_HOOK_PRIORITY, INGRESS_PRIORITY & 0xFFFFFFFF))
    return Message(NFT_MSG_NEWCHAIN, NLM_F_CREATE,
                   _string(NFTA_CHAIN_TABLE, TABLE_NAME) + _string(NFTA_CHAIN_NAME, INGRESS_CHAIN)
                   + _string(NFTA_CHAIN_TYPE, "filter") + _u32(NFTA_CHAIN_POLICY, NF_ACCEPT) + hook)


# -- sets and elements -------------------------------------------------------------


def _service_sets(set_ids: dict[str, int], service: ServiceRules, family: int, now: float) -> list[Message]:
    key_type, width = (TYPE_IPADDR, 4) if family == 4 else (TYPE_IP6ADDR, 16)
    intervals = service.intervals(family)
    timeouts = NFT_SET_TIMEOUT if intervals.has_timeouts else 0
    singles, ranges = intervals.partition_singles()
    byteorder = _udata(NFTNL_UDATA_SET_KEYBYTEORDER, struct.pack("=I", BYTEORDER_BIG_ENDIAN))
    messages = _set_messages(set_ids, hosts_set_name(service.set_name(family)), key_type, width, timeouts,
                             byteorder, _host_chunks(singles, now))
    # auto-merge only without timeouts: see ruleset._set_lines.
    merge = b"" if timeouts else _udata(NFTNL_UDATA_SET_MERGE_ELEMENTS, struct.pack("=I", 1))
    messages += _set_messages(set_ids, service.set_name(family), key_type, width, NFT_SET_INTERVAL | timeouts,
                              byteorder + merge, _interval_chunks(ranges, now))
    return messages


def _set_messages(set_ids: dict[str, int], name: str, key_type: int, key_length: int, flags: int,
                  udata: bytes, chunks: list[bytes]) -> list[Message]:
    """The set's declaration, then one element message per chunk (see _listed)."""
    set_id = set_ids[name] = len(set_ids) + 1
    table = _string(NFTA_SET_TABLE, TABLE_NAME)
    declaration = Message(NFT_MSG_NEWSET, NLM_F_CREATE,
                          table + _string(NFTA_SET_NAME, name) + _u32(NFTA_SET_FLAGS, flags)
                          + _u32(NFTA_SET_KEY_TYPE, key_type) + _u32(NFTA_SET_KEY_LEN, key_length)
                          + _u32(NFTA_SET_ID, set_id) + _attribute(NFTA_SET_USERDATA, udata))
    names = table + _string(NFTA_SET_ELEM_LIST_SET, name) + _u32(NFTA_SET_ELEM_LIST_SET_ID, set_id)
    return [declaration] + [
        Message(NFT_MSG_NEWSETELEM, NLM_F_CREATE,
                names + _NLA.pack(_NLA.size + len(chunk), NLA_F_NESTED | NFTA_SET_ELEM_LIST_ELEMENTS) + chunk)
        for chunk in chunks]


def _listed(elements: list[bytes], first_position: int = 1) -> bytes:
    """Elements as the items of an element list. Each item's attribute type is its
    position, counted from 1, as libnftnl numbers them."""
    return b"".join([_NLA.pack(_NLA.size + len(element), NLA_F_NESTED | position) + element
                     for position, element in enumerate(elements, first_position)])


def _chunks(elements: list[bytes]) -> list[bytes]:
    return [_listed(elements[start:start + ELEMENTS_PER_MESSAGE])
            for start in range(0, len(elements), ELEMENTS_PER_MESSAGE)]


def _key_prefix(width: int) -> bytes:
    """NFTA_SET_ELEM_KEY holding NFTA_DATA_VALUE, up to the value's bytes."""
    return _NLA.pack(2 * _NLA.size + width, NLA_F_NESTED | NFTA_SET_ELEM_KEY) + _NLA.pack(_NLA.size + width,
                                                                                         NFTA_DATA_VALUE)


def _element(*, key: bytes, flags: bytes = b"", timeout: bytes = b"", udata: bytes = b"") -> bytes:
    # nft's order: flags, timeout, key, user data. Every part is a multiple of 4 bytes.
    return flags + timeout + _key_prefix(len(key)) + key + udata


def _timeout(milliseconds: int) -> bytes:
    return _NLA.pack(12, NFTA_SET_ELEM_TIMEOUT) + milliseconds.to_bytes(8, "big")


_INTERVAL_END = _NLA.pack(8, NFTA_SET_ELEM_FLAGS) + NFT_SET_ELEM_INTERVAL_END.to_bytes(4, "big")
# libnftnl's user data TLV that marks the start of a range reaching the family's last address.
_INTERVAL_OPEN = _NLA.pack(10, NFTA_SET_ELEM_USERDATA) + bytes((NFTNL_UDATA_SET_ELEM_FLAGS, 4)) + struct.pack(
    "=I", NFTNL_SET_ELEM_F_INTERVAL_OPEN) + b"\0\0"


def _expiry_timeouts(intervals: IntervalSet, now: float) -> list[bytes]:
    if not intervals.has_timeouts:
        return [b""] * len(intervals)
    return [b"" if interval.expires == float("inf") else _timeout(timeout_seconds(interval, now) * 1000)
            for interval in intervals]


# Most of a large load is elements of one shape each (a permanent single address; a
# permanent range's start and end), and building each as its own bytes object costs
# more than sending it. Those are written column by column instead: every element part
# is a whole number of 32-bit units, so a chunk is a table of units whose columns are
# constant attribute headers, position headers, or address words sliced out of the
# set's own bytes with a stride.
def _units(data: bytes) -> memoryview:
    return memoryview(data).cast("I")


def _constant(part: bytes, count: int) -> array[int]:
    return array("I", part) * count


_HEADERS: dict[int, array[int]] = {}


def _headers(size: int, first: int, step: int, count: int) -> array[int]:
    """The item headers of count elements of size bytes at positions first, first + step, ..."""
    if size not in _HEADERS:
        _HEADERS[size] = array("I", b"".join([_NLA.pack(size, NLA_F_NESTED | position)
                                              for position in range(1, ELEMENTS_PER_MESSAGE + 2)]))
    return _HEADERS[size][first - 1:first - 1 + step * count:step]


def _table(columns: list[array[int] | memoryview], count: int) -> bytes:
    table = bytearray(4 * len(columns) * count)
    view = memoryview(table).cast("I")
    for index, column in enumerate(columns):
        view[index::len(columns)] = column
    return bytes(table)


def _host_chunks(singles: IntervalSet, now: float) -> list[bytes]:
    if singles.has_timeouts:
        return _chunks(host_elements(singles, now))
    width = 4 if singles.family == 4 else 16
    prefix, ranges = _key_prefix(width), singles.ranges
    words, record = width // 4, 2 * width // 4
    addresses = _units(ranges)
    chunks = []
    for start in range(0, len(singles), ELEMENTS_PER_MESSAGE):
        count = min(ELEMENTS_PER_MESSAGE, len(singles) - start)
        columns: list[array[int] | memoryview] = [_headers(_NLA.size + len(prefix) + width, 1, 1, count)]
        columns += [_constant(prefix[i:i + 4], count) for i in range(0, len(prefix), 4)]
        columns += [addresses[record * start + word:record * (start + count):record] for word in range(words)]
        chunks.append(_table(columns, count))
    return chunks


def host_elements(singles: IntervalSet, now: float) -> list[bytes]:
    """Each single address as a hash set element, one by one (_host_chunks' reference)."""
    width = 4 if singles.family == 4 else 16
    prefix, ranges = _key_prefix(width), singles.ranges
    return [timeout + prefix + ranges[offset:offset + width]
            for offset, timeout in zip(range(0, len(ranges), 2 * width), _expiry_timeouts(singles, now), strict=True)]


def interval_elements(intervals: IntervalSet, now: float) -> list[bytes]:
    """Each interval as a start element and an end element one past its last address,
    one by one (_interval_chunks' reference). nft also starts the set with an end
    element at address zero when no interval starts there, and so does this."""
    width = 4 if intervals.family == 4 else 16
    prefix, ranges, top = _key_prefix(width), intervals.ranges, family_max(intervals.family)
    end = _INTERVAL_END + prefix
    elements = [end + bytes(width)] if intervals and intervals[0].first != 0 else []
    _firsts, lasts = intervals.bounds()
    for index, (last, timeout) in enumerate(zip(lasts, _expiry_timeouts(intervals, now), strict=True)):
        offset = index * 2 * width
        start = timeout + prefix + ranges[offset:offset + width]
        elements += [start + _INTERVAL_OPEN] if last == top else [start, end + (last + 1).to_bytes(width, "big")]
    return elements


def _interval_chunks(intervals: IntervalSet, now: float) -> list[bytes]:
    """interval_elements in chunks, permanent sets written column by column."""
    if intervals.has_timeouts:
        return _chunks(interval_elements(intervals, now))
    family = intervals.family
    width = 4 if family == 4 else 16
    prefix, ranges, top = _key_prefix(width), intervals.ranges, family_max(family)
    end = _INTERVAL_END + prefix
    leading = [end + bytes(width)] if intervals and intervals[0].first != 0 else []
    _firsts, lasts = intervals.bounds()
    # Only the last interval can reach the top address (they are ordered and disjoint).
    open_ended = bool(lasts) and lasts[-1] == top
    closed = len(lasts) - open_ended
    if family == 4:
        ends = _units(struct.pack(f">{closed}I", *[last + 1 for last in lasts[:closed]]))
    else:
        ends = _units(b"".join([(last + 1).to_bytes(16, "big") for last in lasts[:closed]]))
    words, record = width // 4, 2 * width // 4
    firsts = _units(ranges)
    start_size, end_size = _NLA.size + len(prefix) + width, _NLA.size + len(end) + width
    chunks = []
    pairs = ELEMENTS_PER_MESSAGE // 2
    in_last = 0  # elements in the last chunk
    for begin in range(0, closed, pairs):
        count = min(pairs, closed - begin)
        shift = len(leading) if begin == 0 else 0
        columns: list[array[int] | memoryview] = [_headers(start_size, 1 + shift, 2, count)]
        columns += [_constant(prefix[i:i + 4], count) for i in range(0, len(prefix), 4)]
        columns += [firsts[record * begin + word:record * (begin + count):record] for word in range(words)]
        columns.append(_headers(end_size, 2 + shift, 2, count))
        columns += [_constant(end[i:i + 4], count) for i in range(0, len(end), 4)]
        columns += [ends[words * begin + word:words * (begin + count):words] for word in range(words)]
        chunks.append((_listed(leading) if shift else b"") + _table(columns, count))
        in_last = shift + 2 * count
    if not chunks and (leading or open_ended):
        chunks.append(_listed(leading))
        in_last = len(leading)
    if open_ended:
        offset = (len(lasts) - 1) * 2 * width
        chunks[-1] += _listed([prefix + ranges[offset:offset + width] + _INTERVAL_OPEN], in_last + 1)
    return chunks


# -- rules -------------------------------------------------------------------------


def _rules(ruleset: Ruleset, set_ids: dict[str, int]) -> list[Message]:
    rules = [(INGRESS_CHAIN, [_meta(NFT_META_IIF), _cmp(NFT_CMP_EQ, struct.pack("=I", LOOPBACK_IFINDEX)),
                              _verdict(NF_ACCEPT)])]
    for service in ruleset.services:
        for protocol in service.protocols:
            for ports in service.ports:
                match = [_meta(NFT_META_L4PROTO), _cmp(NFT_CMP_EQ, bytes((IPPROTO[protocol],))),
                         _payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)]
                if ports.first == ports.last:
                    match.append(_cmp(NFT_CMP_EQ, ports.first.to_bytes(2, "big")))
                else:
                    match += [_cmp(NFT_CMP_GTE, ports.first.to_bytes(2, "big")),
                              _cmp(NFT_CMP_LTE, ports.last.to_bytes(2, "big"))]
                rules.append((INGRESS_CHAIN, [*match, _verdict(NFT_JUMP, service.chain)]))
    for service in ruleset.services:
        rules += [(service.chain, expressions) for expressions in _service_rules(ruleset, service, set_ids)]
    return [Message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND,
                    _string(NFTA_RULE_TABLE, TABLE_NAME) + _string(NFTA_RULE_CHAIN, chain)
                    + _nest(NFTA_RULE_EXPRESSIONS, b"".join(expressions)))
            for chain, expressions in rules]


def _service_rules(ruleset: Ruleset, service: ServiceRules, set_ids: dict[str, int]) -> Iterator[list[bytes]]:
    """The rules of ruleset._service_chain_lines, in its order."""
    dropped = _objref(service.dropped_counter)
    rate = None if service.log == "off" else ruleset.log_rate if service.log is None else service.log
    local_only = [_fib(NFTA_FIB_F_DADDR, NFT_FIB_RESULT_ADDRTYPE), _cmp(NFT_CMP_NEQ, struct.pack("=I", RTN_LOCAL)),
                  _verdict(NFT_RETURN)]
    if ruleset.strict_source:
        yield local_only
        spoofed = [_fib(NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF | NFTA_FIB_F_PRESENT, NFT_FIB_RESULT_OIF),
                   _cmp(NFT_CMP_EQ, bytes(4))]
        if rate is not None:
            yield [*spoofed, *_logged(ruleset, rate, f"{LOG_PREFIX}{service.name}{SPOOFED_SUFFIX}")]
        yield [*spoofed, dropped, _verdict(0)]
    for family, nfproto, offset, width in ((4, NFPROTO_IPV4, 12, 4), (6, NFPROTO_IPV6, 8, 16)):
        for name in (hosts_set_name(service.set_name(family)), service.set_name(family)):
            yield [_meta(NFT_META_NFPROTO), _cmp(NFT_CMP_EQ, bytes((nfproto,))),
                   _payload(NFT_PAYLOAD_NETWORK_HEADER, offset, width), _lookup(name, set_ids[name]),
                   _objref(service.accepted_counter), _verdict(NF_ACCEPT)]
    if not ruleset.strict_source:
        yield local_only
    if rate is not None:
        yield _logged(ruleset, rate, f"{LOG_PREFIX}{service.name}")
    if service.action == "reject":
        yield [_meta(NFT_META_L4PROTO), _cmp(NFT_CMP_EQ, bytes((IPPROTO["tcp"],))), dropped,
               _reject(NFT_REJECT_TCP_RST, 0)]
        yield [dropped, _reject(NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_PORT_UNREACH)]
    else:
        yield [dropped, _verdict(0)]  # NF_DROP


def _logged(ruleset: Ruleset, rate: int, prefix: str) -> list[bytes]:
    """The rate-limited log of a drop: the limit is in the kernel, so a flood cannot swamp the reader."""
    return [_expression("limit", _u64(1, rate) + _u64(2, 1) + _u32(3, ruleset.log_burst)
                        + _u32(4, 0) + _u32(5, 0)),
            _expression("log", _string(2, prefix) + _attribute(1, ruleset.log_group.to_bytes(2, "big")))]


def _expression(name: str, data: bytes) -> bytes:
    return _nest(NFTA_LIST_ELEM, _string(NFTA_EXPR_NAME, name) + _nest(NFTA_EXPR_DATA, data))


def _meta(key: int) -> bytes:
    return _expression("meta", _u32(2, key) + _u32(1, NFT_REG_1))  # key, dreg


def _cmp(operation: int, value: bytes) -> bytes:
    return _expression("cmp", _u32(1, NFT_REG_1) + _u32(2, operation) + _nest(3, _attribute(NFTA_DATA_VALUE, value)))


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expression("payload", _u32(1, NFT_REG_1) + _u32(2, base) + _u32(3, offset) + _u32(4, length))


def _lookup(set_name: str, set_id: int) -> bytes:
    return _expression("lookup", _u32(2, NFT_REG_1) + _string(1, set_name) + _u32(4, set_id))  # sreg, set, id


def _objref(counter: str) -> bytes:
    # libnftnl sends this name without its NUL (mnl_attr_put_str), unlike every other.
    return _expression("objref", _u32(1, NFT_OBJECT_COUNTER) + _attribute(2, counter.encode()))


def _fib(flags: int, result: int) -> bytes:
    return _expression("fib", _u32(3, flags) + _u32(2, result) + _u32(1, NFT_REG_1))


def _reject(kind: int, code: int) -> bytes:
    return _expression("reject", _u32(1, kind) + _attribute(2, bytes((code,))))


def _verdict(code: int, chain: str | None = None) -> bytes:
    verdict = _u32(NFTA_VERDICT_CODE, code & 0xFFFFFFFF)
    if chain is not None:
        verdict += _string(NFTA_VERDICT_CHAIN, chain)
    data = _nest(2, _nest(NFTA_DATA_VERDICT, verdict))
    return _expression("immediate", _u32(1, NFT_REG_VERDICT) + data)


# -- attributes --------------------------------------------------------------------


def _attribute(kind: int, value: bytes) -> bytes:
    length = _NLA.size + len(value)
    return _NLA.pack(length, kind) + value + b"\0" * (-length % 4)


def _nest(kind: int, content: bytes) -> bytes:
    return _attribute(NLA_F_NESTED | kind, content)


def _string(kind: int, text: str) -> bytes:
    return _attribute(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attribute(kind, value.to_bytes(4, "big"))


def _u64(kind: int, value: int) -> bytes:
    return _attribute(kind, value.to_bytes(8, "big"))


def _udata(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value
