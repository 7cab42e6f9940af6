"""The elements of the kernel's hostwall sets, from libnftables' JSON listing. Pure.

nft.parse_listing builds each address through ipaddress (7 s for 125k elements);
verify needs only first and last address, which inet_pton gives at C speed.
"""

from __future__ import annotations

import socket
from typing import Any

from hostwall.cidr import Interval
from hostwall.errors import KernelError
from hostwall.ruleset import logical_set_name

_FAMILY = {"ipv4_addr": (4, socket.AF_INET, 32), "ipv6_addr": (6, socket.AF_INET6, 128)}


def kernel_sets(document: dict[str, Any]) -> dict[str, list[Interval]]:
    """Per logical set (a hash set of single addresses joins its interval set), the
    elements as intervals."""
    sets: dict[str, list[Interval]] = {}
    for item in document.get("nftables", []):
        body = item.get("set")
        if body is None or body.get("type") not in _FAMILY:
            continue
        family, address_family, bits = _FAMILY[body["type"]]
        found = sets.setdefault(logical_set_name(body["name"]), [])
        for element in body.get("elem", []):
            first, last = _bounds(element, address_family, bits)
            found.append(Interval(family, first, last))
    return sets


def _address(text: str, address_family: int) -> int:
    return int.from_bytes(socket.inet_pton(address_family, text), "big")


def _bounds(element: Any, address_family: int, bits: int) -> tuple[int, int]:
    if isinstance(element, dict) and "elem" in element:
        element = element["elem"]["val"]
    if isinstance(element, str):
        address = _address(element, address_family)
        return address, address
    if isinstance(element, dict) and "prefix" in element:
        first = _address(element["prefix"]["addr"], address_family)
        return first, first | ((1 << (bits - int(element["prefix"]["len"]))) - 1)
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        return _address(low, address_family), _address(high, address_family)
    raise KernelError(f"unexpected set element in the kernel's listing: {element!r}")
