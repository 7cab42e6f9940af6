"""The libnftables adapter: the only module that imports the nftables binding."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from typing import Any

from hostwall import netns
from hostwall.cidr import Interval
from hostwall.errors import (
    HostwallError,
    KernelError,
    KernelRejected,
    KernelUnavailable,
    PermissionDenied,
    TableNotFound,
)
from hostwall.kernel import Counter, KernelTable
from hostwall.ruleset import TABLE_FAMILY, TABLE_NAME

_TABLE = f"{TABLE_FAMILY} {TABLE_NAME}"
_COMMENT_LINE = re.compile(r'^\s*comment "([^"]*)"\s*$', re.MULTILINE)


def _classify(message: str) -> HostwallError:
    text = message.strip().splitlines()[0] if message.strip() else "libnftables failed"
    lowered = message.lower()
    if "operation not permitted" in lowered:
        return PermissionDenied(f"the kernel refused: {text} (needs CAP_NET_ADMIN; run as root)")
    if "no such file or directory" in lowered and "table" in lowered:
        return TableNotFound(text)
    if "protocol not supported" in lowered or "not supported" in lowered:
        return KernelUnavailable(f"nf_tables is not available: {text}")
    return KernelRejected(f"the kernel rejected the transaction: {' '.join(message.split())[:500]}")


class NftBackend:
    def __init__(self, netns_name: str | None = None) -> None:
        self._netns = netns_name
        try:
            import nftables
        except ImportError as exc:
            raise KernelUnavailable(
                "the nftables Python binding is missing (pip install pip-nftables)"
            ) from exc
        with netns.entered(netns_name):
            try:
                self._nft = nftables.Nftables()
            except OSError as exc:
                raise KernelUnavailable(
                    f"libnftables cannot be loaded ({exc}); install libnftables1"
                ) from exc
        self._nft.set_handle_output(False)
        self._nft.set_stateless_output(False)

    def _run(self, command: str, *, json_output: bool = False, terse: bool = False) -> str:
        with netns.entered(self._netns):
            self._nft.set_json_output(json_output)
            self._nft.set_terse_output(terse)
            rc, output, error = self._nft.cmd(command)
        if rc != 0:
            raise _classify(error or output)
        return str(output)

    def submit(self, transaction: str) -> None:
        self._run(transaction)

    def read_table(self, *, elements: bool) -> KernelTable | None:
        try:
            text = self._run(f"list table {_TABLE}", terse=True)
            listing = self._run(f"list table {_TABLE}", json_output=True, terse=not elements)
        except TableNotFound:
            return None
        match = _COMMENT_LINE.search(text)
        return parse_listing(
            json.loads(listing), comment=match[1] if match else None, with_elements=elements
        )


def parse_listing(document: dict[str, Any], *, comment: str | None, with_elements: bool) -> KernelTable:
    counters: dict[str, Counter] = {}
    sets: dict[str, tuple[Interval, ...]] = {}
    structure: list[Any] = []
    for item in document.get("nftables", []):
        kind, body = next(iter(item.items()))
        if kind == "metainfo":
            continue
        body = dict(body)
        body.pop("handle", None)
        if kind == "counter":
            counters[body["name"]] = Counter(body.pop("packets", 0), body.pop("bytes", 0))
        elif kind == "set":
            elems = body.pop("elem", [])
            family = 4 if body["type"] == "ipv4_addr" else 6
            sets[body["name"]] = tuple(sorted(_interval(family, e) for e in elems))
        elif kind == "rule":
            body["expr"] = [_without_counter_values(e) for e in body.get("expr", [])]
        structure.append({kind: body})
    fingerprint = hashlib.sha256(
        json.dumps(structure, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return KernelTable(comment, fingerprint, counters, sets if with_elements else None)


def _without_counter_values(expression: Any) -> Any:
    if isinstance(expression, dict) and isinstance(expression.get("counter"), dict):
        return {"counter": None}
    return expression


def _interval(family: int, element: Any) -> Interval:
    expires = math.inf
    if isinstance(element, dict) and "elem" in element:
        inner = element["elem"]
        if "timeout" in inner:
            # The kernel reports time left; planning compares by presence, not value.
            expires = float(inner.get("expires", inner["timeout"]))
        element = inner["val"]
    if isinstance(element, str):
        address = int(ipaddress.ip_address(element))
        return Interval(family, address, address, expires)
    if "prefix" in element:
        prefix = element["prefix"]
        network = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
        return Interval.of(network, expires)
    if "range" in element:
        first, last = element["range"]
        return Interval(family, int(ipaddress.ip_address(first)), int(ipaddress.ip_address(last)), expires)
    raise KernelError(f"unexpected set element in kernel listing: {element!r}")
