"""One policy file as validated: plain data that loading merges, and that a cache keeps
by the file's content so that an unchanged file needs neither YAML nor the models.

The models (hostwall.policyfile, pydantic) validate a file and turn it into a FileSpec,
or hostwall.policyplain does when every value is plainly valid; hostwall.policy merges
FileSpecs, whether just validated or read back from the cache.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, Literal

from msgspec import Struct
from msgspec import json as msgspec_json

from hostwall import __version__

Protocol = Literal["tcp", "udp"]
Action = Literal["drop", "reject"]


class Bounds(Struct, frozen=True):
    """An int a policy file may set: its default and the range allowed."""

    default: int
    low: int
    high: int


# The models (hostwall.policyfile) and the plain check (hostwall.policyplain) both take
# these, so that the two cannot disagree on a bound.
WIDEST_BOUNDS = {"ipv4": Bounds(24, 0, 32), "ipv6": Bounds(48, 0, 128)}
SETTINGS_BOUNDS = {"log_group": Bounds(100, 0, 65535), "log_rate": Bounds(10, 1, 100000),
                   "log_burst": Bounds(20, 1, 100000)}
# A service's own drop-log rate (records per second) takes the place of settings' log_rate.
LOG_RATES = range(SETTINGS_BOUNDS["log_rate"].low, SETTINGS_BOUNDS["log_rate"].high + 1)
# Bump whenever what a validated policy file means changes (a validator, a default, a
# field), so that files validated by an earlier version are validated again. The
# release is part of the check as well: an upgrade validates every file once more even
# where a bump was forgotten.
SPEC_SEMANTICS = 2


class PortRange(Struct, frozen=True, order=True):
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def contains(self, port: int) -> bool:
        return self.first <= port <= self.last


def shown(value: object, limit: int = 60) -> str:
    """repr of an operator's value, cut short so that an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_port(value: Any) -> PortRange:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a port is a number (443) or a range string ('8000-8100'), not {shown(value)}")
    if isinstance(value, int):
        first = last = value
    else:
        match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", value.strip())
        if not match:
            raise ValueError(
                f"port {shown(value)} is neither a number nor a range; write 443 or '8000-8100'"
            )
        first, last = int(match[1]), int(match[2])
        if first > last:
            raise ValueError(f"port range {value!r} is reversed; write '{last}-{first}'")
    for port in (first, last):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is outside 1-65535")
    return PortRange(first, last)


class AllowSpec(Struct, frozen=True, array_like=True):
    """A validated allow entry: exactly one of cidr and file. (Kept as an array by the
    cache: a policy may hold thousands.)"""

    line: int | None
    cidr: str | None
    file: str | None
    owner: str
    reason: str
    review_by: date
    expires: datetime | None  # always with a time zone
    broad_ok: bool = False


class ServiceSpec(Struct, frozen=True):
    """A service as one file writes it; None: not given in this file."""

    name: str
    line: int | None
    ports: tuple[PortRange, ...] | None = None
    protocols: tuple[Protocol, ...] | None = None
    action: Action | None = None
    widest: tuple[int, int] | None = None  # (ipv4, ipv6)
    entry_counters: bool | None = None
    log: Literal["off"] | int | None = None
    allow: tuple[AllowSpec, ...] = ()

    @property
    def defines(self) -> bool:
        """Whether the file defines the service rather than only adding entries to it."""
        return any(value is not None for value in (self.ports, self.protocols, self.action, self.widest,
                                                   self.entry_counters, self.log))


class FileSpec(Struct, frozen=True):
    settings: dict[str, Any] | None  # SettingsModel's fields, owners as a list or None
    settings_line: int | None
    services: tuple[ServiceSpec, ...]

    def to_json(self) -> bytes:
        # msgspec encodes and decodes the structs themselves, in C: a 12.5k-entry file's
        # form is about 1 MB, and building and reading it in Python took 20 ms each way.
        return msgspec_json.encode(_Cached(SPEC_SEMANTICS, __version__, self.settings, self.settings_line,
                                           self.services))

    @classmethod
    def from_json(cls, data: bytes) -> FileSpec:
        """ValueError (msgspec's DecodeError is one) unless data is what to_json wrote with
        this version's semantics."""
        cached = _CACHED.decode(data)
        if (cached.semantics, cached.version) != (SPEC_SEMANTICS, __version__):
            raise ValueError("validated by another version of the policy rules")
        return cls(cached.settings, cached.settings_line, cached.services)


class _Cached(Struct, frozen=True):
    """A FileSpec as the cache keeps it, with what validated it."""

    semantics: int
    version: str
    settings: dict[str, Any] | None
    settings_line: int | None
    services: tuple[ServiceSpec, ...]


_CACHED = msgspec_json.Decoder(_Cached)
