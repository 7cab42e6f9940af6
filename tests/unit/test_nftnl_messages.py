"""The element batch hostwall packs by hand, byte for byte against pyroute2's nf_tables
message classes (an independent encoder of the same kernel ABI).

The reference takes nothing from hostwall but the elements' order: addresses are
ipaddress's network byte order (nf_tables keys are big-endian), the last address of a
family and the timeouts in milliseconds are written out here, as nf_tables.h defines
NFTA_SET_ELEM_TIMEOUT (be64, ms) and hostwall promises them (whole seconds, rounded up).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink import nftsocket as nft

from hostwall import nftnl
from hostwall.cidr import Interval

NOW = 1_800_000_000.0
# Seconds left at NOW -> NFTA_SET_ELEM_TIMEOUT in milliseconds: rounded up to whole seconds,
# so that an entry never leaves the kernel early.
TIMEOUT_MS = {NOW + 90.5: 91_000, NOW + 7 * 86400: 604_800_000, NOW + 3: 3_000}
LAST_ADDRESS = {4: int(ipaddress.IPv4Address("255.255.255.255")),
                6: int(ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))}


def address_bytes(family: int, value: int) -> bytes:
    return (ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)).packed


def reference_batch_message(kind: int, sequence: int) -> bytes:
    message = nfgen_msg()
    message["res_id"] = NFNL_SUBSYS_NFTABLES
    message["header"]["type"] = kind
    message["header"]["flags"] = NLM_F_REQUEST
    message["header"]["sequence_number"] = sequence
    message.encode()
    return bytes(message.data)


def reference_host(interval: Interval, *, with_timeout: bool) -> dict[str, Any]:
    attributes: list[list[Any]] = [
        ["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", address_bytes(interval.family, interval.first)]]}]
    ]
    if with_timeout and interval.expires != float("inf"):
        attributes.append(["NFTA_SET_ELEM_TIMEOUT", TIMEOUT_MS[interval.expires]])
    return {"attrs": attributes}


def reference_interval(interval: Interval, *, with_timeout: bool) -> list[dict[str, Any]]:
    start = reference_host(interval, with_timeout=with_timeout)["attrs"]
    if interval.last == LAST_ADDRESS[interval.family]:
        start.append(["NFTA_SET_ELEM_USERDATA", [["NFTNL_UDATA_SET_ELEM_FLAGS", struct.pack("=I", 1)]]])
        return [{"attrs": start}]
    end = [
        ["NFTA_SET_ELEM_KEY",
         {"attrs": [["NFTA_DATA_VALUE", address_bytes(interval.family, interval.last + 1)]]}],
        ["NFTA_SET_ELEM_FLAGS", frozenset({1})],
    ]
    return [{"attrs": start}, {"attrs": end}]


def reference_element_message(kind: int, set_name: str, elements: list[dict[str, Any]], sequence: int) -> bytes:
    message = nft.nft_set_elem_list_msg()
    message["nfgen_family"] = 1
    message["attrs"] = [["NFTA_SET_ELEM_LIST_TABLE", "hostwall"], ["NFTA_SET_ELEM_LIST_SET", set_name],
                        ["NFTA_SET_ELEM_LIST_ELEMENTS", elements]]
    message["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    flags = NLM_F_REQUEST | NLM_F_ACK
    if kind == nft.NFT_MSG_NEWSETELEM:
        flags |= NLM_F_CREATE | NLM_F_EXCL
    message["header"]["flags"] = flags
    message["header"]["sequence_number"] = sequence
    message.encode()
    return bytes(message.data)


class Packer(nftnl.NetlinkTable):
    """The message builders without a socket."""

    def __init__(self) -> None:
        self._table = "hostwall"
        self._sequence = 0


INTERVALS = [
    Interval(4, 0xCB007100, 0xCB0071FF),  # 203.0.113.0/24
    Interval(4, 0xC6336405, 0xC6336405, NOW + 90.5),  # a single address with a timeout
    Interval(4, 0xFFFFFF00, 0xFFFFFFFF),  # reaches the last address: no end element
    Interval(6, 0x20010DB8 << 96, (0x20010DB8 << 96) | ((1 << 80) - 1), NOW + 7 * 86400),
    Interval(6, (1 << 128) - 256, (1 << 128) - 1, NOW + 3),
]


@pytest.mark.parametrize("kind", [nftnl.NFNL_MSG_BATCH_BEGIN, nftnl.NFNL_MSG_BATCH_END])
def test_batch_messages_match_pyroute2(kind: int) -> None:
    sequence, packed = Packer()._batch_message(kind)
    assert packed == reference_batch_message(kind, sequence)


@pytest.mark.parametrize("kind", [nft.NFT_MSG_NEWSETELEM, nft.NFT_MSG_DELSETELEM])
@pytest.mark.parametrize("with_timeout", [True, False])
@pytest.mark.parametrize("count", [1, 5, 600])  # 600 intervals span three messages
def test_element_messages_match_pyroute2(kind: int, with_timeout: bool, count: int) -> None:
    intervals = [INTERVALS[i % len(INTERVALS)] for i in range(count)]
    packed = Packer()._element_messages(
        kind, "https_v4", [e for i in intervals for e in nftnl._interval_elements(i, NOW, with_timeout=with_timeout)])
    elements = [e for i in intervals for e in reference_interval(i, with_timeout=with_timeout)]
    chunks = [elements[start:start + nftnl.ELEMENTS_PER_MESSAGE]
              for start in range(0, len(elements), nftnl.ELEMENTS_PER_MESSAGE)]
    assert len(packed) == len(chunks)
    for (sequence, data), chunk in zip(packed, chunks, strict=True):
        assert data == reference_element_message(kind, "https_v4", chunk, sequence)


@pytest.mark.parametrize("with_timeout", [True, False])
def test_host_elements_match_pyroute2(with_timeout: bool) -> None:
    """Single addresses, as a delta writes them into the hash sets beside the interval sets."""
    one_v6 = 0x20010DB8 << 96 | 1
    hosts = [i for i in INTERVALS if i.first == i.last] + [Interval(6, one_v6, one_v6, NOW + 3)]
    packed_hosts = [nftnl._host_element(i, NOW, with_timeout=with_timeout) for i in hosts]
    (sequence, packed), = Packer()._element_messages(nft.NFT_MSG_NEWSETELEM, "https_v4_hosts", packed_hosts)
    reference = [reference_host(i, with_timeout=with_timeout) for i in hosts]
    assert packed == reference_element_message(nft.NFT_MSG_NEWSETELEM, "https_v4_hosts", reference, sequence)


def test_marker_element_matches_pyroute2() -> None:
    (sequence, packed), = Packer()._element_messages(nft.NFT_MSG_NEWSETELEM, "generation",
                                                      [nftnl._marker_element(4242)])
    reference = [{"attrs": [["NFTA_SET_ELEM_KEY", {"attrs": [["NFTA_DATA_VALUE", struct.pack("=I", 4242)]]}]]}]
    assert packed == reference_element_message(nft.NFT_MSG_NEWSETELEM, "generation", reference, sequence)
