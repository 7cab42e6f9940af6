"""The nf_tables messages nft sends, read back from `nft --debug=mnl`'s dump.

libmnl prints each message as rows of four bytes beside field labels (message length,
type and flags, sequence, port, the nfgenmsg "extra header", then each attribute's
length, flags and type and its data). This turns the dump back into (type, payload)
pairs: the payload starts after the nfgenmsg header, as hostwall.nftload builds it.
Message flags are not compared: the dump shows only four of them.
"""

from __future__ import annotations

import re

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
_LENGTH = re.compile(r"\|\s+(\d{10})\s+\|\s+\| message length")
_TYPE = re.compile(r"\| (\d{5}) \| .{4} \|\s+\|  type \| flags")
_ATTRIBUTE = re.compile(r"\|(\d{5})\|(..)\|(\d{5})\|\s+\|len \|flags\| type\|")
_DATA = re.compile(r"\| ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})  \|\s+\|\s+(data|extra header)")
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NFNL_SUBSYS_NFTABLES = 10


def messages(dump: str) -> list[tuple[int, bytes]]:
    """(nf_tables message type, payload after nfgenmsg) of every nf_tables message."""
    parsed: list[tuple[int | None, list[bytes]]] = []
    for line in _COLOURS.sub("", dump).splitlines():
        if _LENGTH.match(line):
            parsed.append((None, []))
        elif (found := _TYPE.match(line)) and parsed and parsed[-1][0] is None and not parsed[-1][1]:
            parsed[-1] = (int(found[1]), [])
        elif (found := _ATTRIBUTE.match(line)) and parsed:
            kind = int(found[3]) | (NLA_F_NESTED if found[2][0] == "N" else 0) | (
                NLA_F_NET_BYTEORDER if found[2][1] == "B" else 0)
            parsed[-1][1].append(int(found[1]).to_bytes(2, "little") + kind.to_bytes(2, "little"))
        elif (found := _DATA.match(line)) and parsed:
            parsed[-1][1].append(bytes(int(value, 16) for value in found.groups()[:4]))
    return [(kind & 0xFF, b"".join(rows)[4:]) for kind, rows in parsed
            if kind is not None and kind >> 8 == NFNL_SUBSYS_NFTABLES]


def batch(dump: str) -> list[tuple[int, bytes]]:
    """The messages of the write batch: from the first NEWTABLE on (nft reads its cache first)."""
    found = messages(dump)
    start = next(index for index, (kind, _) in enumerate(found) if kind == 0)
    return found[start:]
