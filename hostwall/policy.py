"""Policy files: strict models, loading with file/line provenance, and merging."""

from __future__ import annotations

import bisect
import functools
import gc
import hashlib
import os
import re
import stat
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import cached_property
from itertools import compress, count, islice
from operator import ne
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload
from typing import Protocol as Interface

from msgspec import Struct, field

from hostwall.cidr import (
    PERMANENT,
    CidrError,
    Interval,
    IntervalSet,
    IPNetwork,
    Records,
    common_bytes,
    merge_same_expiry,
    merged_records,
    parse_interval,
    parse_list_lines,
    range_key,
)
from hostwall.clock import now_utc
from hostwall.errors import PolicyError, Problem
from hostwall.policyspec import (
    SETTINGS_BOUNDS,
    WIDEST_BOUNDS,
    Action,
    AllowSpec,
    FileSpec,
    PortRange,
    Protocol,
    ServiceSpec,
)

if TYPE_CHECKING:
    from hostwall.forked import Child
    from hostwall.yamlsource import LocatedData

# Used with fullmatch: "$" alone would let a trailing newline into nft's input.
SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]{0,23}")
MAX_POLICY_BYTES = 64 * 1024 * 1024
MAX_LIST_BYTES = 256 * 1024 * 1024
PROGRESS_LINES = 4096
Progress = Callable[[str, int, int], None]


class BuiltinService(Struct, frozen=True):
    ports: tuple[PortRange, ...]
    protocols: tuple[Protocol, ...]


# HTTP/3 runs over UDP 443, so https protects both transports.
BUILTIN_SERVICES: dict[str, BuiltinService] = {
    "https": BuiltinService((PortRange(443, 443),), ("tcp", "udp")),
    "postgres": BuiltinService((PortRange(5432, 5432),), ("tcp",)),
}


class Origin(Struct, frozen=True):
    """Where an entry came from: the policy file and line, and a list file's line if any."""

    file: str
    line: int | None
    entry: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


class Entry(Struct, frozen=True, dict=True):  # dict: room for the cached network
    interval: Interval
    owner: str
    reason: str
    review_by: date
    expires: datetime | None
    origin: Origin
    broad_ok: bool = False

    @cached_property
    def network(self) -> IPNetwork:
        network = self.interval.as_prefix()
        assert network is not None  # every entry is parsed from one CIDR
        return network


class ParsedList(Struct, frozen=True):
    """A ``file:`` list's lines, parsed and merged: what a ListCache keeps per content.

    v4 and v6 are IntervalSet records (see cidr.IntervalSet) of the merged lines,
    independent of the expiry of the entry that references the file. lines4 and lines6
    are every line's interval, sorted, duplicates kept, which is what a later version
    of the file is computed from; None when they equal v4 and v6 (no line overlaps or
    touches another, the usual case).
    """

    entries: int
    v4: bytes
    v6: bytes
    lines4: bytes | None = None
    lines6: bytes | None = None

    def lines(self, family: int) -> bytes:
        if family == 4:
            return self.v4 if self.lines4 is None else self.lines4
        return self.v6 if self.lines6 is None else self.lines6

    def encode(self) -> bytes:
        return b"".join(self.encoded())

    def encoded(self) -> tuple[bytes, ...]:
        """encode() in pieces, for writing without joining megabytes first."""
        parts = (self.v4, self.v6, self.lines4 or b"", self.lines6 or b"")
        return (_PARSED_HEADER.pack(LIST_SEMANTICS, self.entries, *map(len, parts)), *parts)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ParsedList:
        """ValueError unless data is what encode wrote (each part is copied once)."""
        if len(data) < _PARSED_HEADER.size:
            raise ValueError("truncated")
        semantics, entries, *sizes = _PARSED_HEADER.unpack_from(data)
        if semantics != LIST_SEMANTICS:
            raise ValueError("parsed by another version of the list rules")
        if len(data) != _PARSED_HEADER.size + sum(sizes) or any(size % (8, 32)[i % 2] for i, size in enumerate(sizes)):
            raise ValueError("lengths do not add up")
        parts, offset = [], _PARSED_HEADER.size
        for size in sizes:
            parts.append(bytes(data[offset:offset + size]))
            offset += size
        return cls(entries, parts[0], parts[1], parts[2] or None, parts[3] or None)


_PARSED_HEADER = struct.Struct(">IQQQQQ")
# Bump whenever what a list line means changes (parse_interval's strictness, comments,
# line splitting, merging), so that lists cached by an earlier version are parsed again.
LIST_SEMANTICS = 1


class ListCache(Interface):
    """Parsed ``file:`` lists by the sha256 of their bytes, so that an unchanged 100k-line
    list is not parsed again, and the last version of each list, so that a changed one
    is parsed only where it changed. A cache only saves time: a miss parses and
    validates every line, with the usual errors."""

    def get(self, sha256: str) -> ParsedList | None: ...

    def put(self, sha256: str, parsed: ParsedList, source: bytes, path: str) -> None:
        """Keep parsed for sha256, and source (whose sha256 it is) as path's latest version."""

    def latest(self, path: str) -> tuple[bytes, ParsedList] | None:
        """The bytes last put for path and their parse."""

    def knows(self, sha256: str, path: str) -> bool:
        """Whether get(sha256) or latest(path) has something, told without reading it: a
        list it knows is not parsed ahead (a wrong answer costs time, never a result)."""

    def validated(self, sha256: str) -> FileSpec | None:
        """The policy file whose bytes have this sha256, as validated before."""

    def keep_validated(self, sha256: str, spec: FileSpec) -> None: ...


class ListFile(Struct, frozen=True, eq=False, dict=True):  # dict: room for the cached entries
    """The entries one ``file:`` list contributes to a service.

    Compiling needs only the merged intervals, so the lines become Entry objects (for
    check, with file:line) only when asked for, parsed again from the same bytes.
    """

    path: str
    data: bytes
    sha256: str
    parsed: ParsedList
    owner: str
    reason: str
    review_by: date
    expires: datetime | None
    label: str
    broad_ok: bool = False
    origin: Origin | None = None  # the file: entry in the policy file

    def __len__(self) -> int:
        return self.parsed.entries

    def intervals(self, family: int) -> IntervalSet:
        ranges = self.parsed.v4 if family == 4 else self.parsed.v6
        intervals = IntervalSet(family, ranges, ordered=True)
        if self.expires is not None and intervals:
            expiry = struct.pack(">d", self.expires.timestamp())
            intervals = IntervalSet(family, ranges, expiry * len(intervals), ordered=True)
        return intervals

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        expires = self.expires.timestamp() if self.expires is not None else PERMANENT
        return tuple(
            Entry(parse_interval(content, expires), self.owner, self.reason, self.review_by, self.expires,
                  Origin(self.path, number, self.label), self.broad_ok)
            for number, content in _list_lines(self.data.decode("utf-8-sig"))
        )


class Entries(Sequence[Entry]):
    """A service's allow entries in policy order, where those of ``file:`` lists are
    materialised only when read (see ListFile). Compares equal to the tuple of them."""

    def __init__(self, parts: Iterable[Entry | ListFile]) -> None:
        self.parts: tuple[Entry | ListFile, ...] = tuple(parts)
        self._length = sum(1 if isinstance(p, Entry) else len(p) for p in self.parts)
        self._all: tuple[Entry, ...] | None = None

    @property
    def lists(self) -> tuple[ListFile, ...]:
        return tuple(p for p in self.parts if isinstance(p, ListFile))

    @property
    def inline(self) -> tuple[Entry, ...]:
        return tuple(p for p in self.parts if isinstance(p, Entry))

    def _materialised(self) -> tuple[Entry, ...]:
        if self._all is None:
            self._all = tuple(e for p in self.parts for e in ((p,) if isinstance(p, Entry) else p.entries))
        return self._all

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._materialised())

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Entry, ...]: ...
    def __getitem__(self, index: int | slice) -> Entry | tuple[Entry, ...]:
        return self._materialised()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Entries | tuple):
            return len(self) == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._materialised())

    def __repr__(self) -> str:
        return f"Entries({len(self)} entries, {len(self.lists)} from lists)"


class Widest(Struct, frozen=True):
    """The widest prefix per family that audit accepts without broad_ok."""

    ipv4: int = WIDEST_BOUNDS["ipv4"].default
    ipv6: int = WIDEST_BOUNDS["ipv6"].default

    def of(self, family: int) -> int:
        return self.ipv4 if family == 4 else self.ipv6


class Service(Struct, frozen=True):
    name: str
    ports: tuple[PortRange, ...]
    protocols: tuple[Protocol, ...]
    action: Action
    entries: Sequence[Entry]  # a tuple, or Entries when file: lists contribute
    defined_in: str
    widest: Widest = Widest()
    entry_counters: bool = False  # a packet counter on every kernel element (for audit)
    listed: bool = True  # False: a built-in service no policy file names (closed by default)
    log: Literal["off"] | int | None = None  # None: settings.log_rate

    @property
    def allows_nobody(self) -> bool:
        """Named in a policy, yet no source may reach it: only loopback does."""
        return self.listed and len(self.entries) == 0

    def allows_nobody_text(self) -> str:
        ports = ",".join(str(p) for p in self.ports) + "/" + "+".join(self.protocols)
        return (f"{self.defined_in}: services.{self.name}: allows no source, so {ports} answers loopback only; "
                "add an allow entry (or remove the service if closing it is meant)")


class Settings(Struct, frozen=True):
    log_group: int = SETTINGS_BOUNDS["log_group"].default
    log_rate: int = SETTINGS_BOUNDS["log_rate"].default
    log_burst: int = SETTINGS_BOUNDS["log_burst"].default
    strict_source: bool = False
    owners: tuple[str, ...] | None = None  # who may own entries; None: anyone


class Policy(Struct, frozen=True):
    services: tuple[Service, ...]
    settings: Settings
    files: tuple[Path, ...]
    expired: tuple[Entry, ...]
    # The bytes of every file read (policy files and lists) by path, exactly as parsed:
    # a generation records these, never a later version of the same file.
    sources: Mapping[str, bytes] = field(default_factory=dict)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def warnings(self) -> list[str]:
        return [
            f"{entry.origin}: {entry.origin.entry}: {entry.network} expired at "
            f"{entry.expires.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}; not loaded (remove it from the file)"
            for entry in self.expired
            if entry.expires is not None
        ] + [service.allows_nobody_text() for service in self.services if service.allows_nobody] + [
            gap.warning() for gap in self.unprotected_builtins()]

    def unprotected_builtins(self) -> list[UnprotectedPort]:
        """Built-in ports that no service protects: a policy that redefines https's ports
        (say [8443]) leaves 443 open to everyone, which is rarely what was meant."""
        gaps = []
        for name, builtin in BUILTIN_SERVICES.items():
            for protocol in builtin.protocols:
                for ports in builtin.ports:
                    covered = any(protocol in s.protocols and any(p.contains(ports.first) for p in s.ports)
                                  for s in self.services)
                    if not covered:
                        defined = self.service(name)
                        gaps.append(UnprotectedPort(name, ports.first, protocol,
                                                    defined.defined_in if defined else "built-in"))
        return gaps


class UnprotectedPort(Struct, frozen=True):
    service: str
    port: int
    protocol: Protocol
    defined_in: str

    def warning(self) -> str:
        return (f"{self.defined_in}: services.{self.service}: built-in port {self.port}/{self.protocol} is not "
                f"protected by any service, so every source reaches it; add {self.port} to the ports of "
                f"{self.service} (or of another service) unless it is meant to be open")


def policy_files(path: Path) -> list[Path]:
    """The files a policy path stands for: the file itself, or the directory's *.yaml."""
    if not path.exists():
        raise PolicyError([Problem(str(path), None, "", "no such file or directory")])
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and not p.is_dir())
        if not files:
            raise PolicyError(
                [Problem(str(path), None, "", "no *.yaml policy files in this directory")]
            )
        return files
    # A single file is read and quoted in errors as root: through a symlink, or under
    # another name, a policy path could name any file on the host.
    if path.is_symlink():
        raise PolicyError([Problem(str(path), None, "", "is a symlink; name the policy file itself "
                                   f"({path.resolve()}) or its directory")])
    if path.is_file() and path.suffix not in (".yaml", ".yml"):  # others: read_regular says what they are
        raise PolicyError([Problem(str(path), None, "", "is not a policy file (*.yaml or *.yml); hostwall "
                                   "reads nothing else")])
    return [path]


def policy_root(path: Path) -> Path:
    """The directory every policy file and file: list must resolve into."""
    resolved = path.resolve()
    return resolved if resolved.is_dir() else resolved.parent


class _Unreadable(Exception):
    """Why a policy file or list cannot be used, in words for an operator."""


def read_regular(path: Path, root: Path, limit: int) -> bytes:
    """The bytes of path, which must resolve to a regular file inside root.

    The agent runs as root: a symlink or a file: path that leaves the policy directory
    would make it read (and quote, in error messages) any file on the host, and a FIFO
    or a device would block a reload or fill memory. O_NONBLOCK keeps the open of a FIFO
    from waiting for a writer; the type is checked on the opened descriptor, so a file
    swapped in between cannot slip past.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise _Unreadable(f"resolves to {resolved}, outside the policy directory {root}; "
                          "copy the file into the policy directory")
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _Unreadable(str(exc.strerror)) from exc
    # The type is checked before fdopen, which refuses a directory with its own error.
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _Unreadable("not a regular file (a directory, FIFO or device); a policy file or list must be a "
                          "plain file")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as exc:
            raise _Unreadable(str(exc.strerror)) from exc
    if len(data) > limit:
        raise _Unreadable(f"larger than {limit} bytes; split it into several files")
    return data


class _ServiceDraft(Struct):
    name: str
    definition: ServiceSpec | None
    defined_in: str | None
    entries: list[Entry | ListFile]
    first_seen: str = "?"


def load_policy(path: Path, now: datetime | None = None, cache: ListCache | None = None,
                progress: Progress | None = None) -> Policy:
    """Load, validate and merge the policy at path (a file or a directory of *.yaml).

    With a cache, a ``file:`` list whose bytes were parsed before is not parsed again.
    progress(label, lines done, lines) is told how parsing a long list goes.
    """
    with _collector_paused(), _Ahead() as ahead:
        return _load_policy(path, now, cache, progress, ahead)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Loading makes a few objects per YAML node and per entry and keeps most of them, so
    CPython's cyclic collector, triggered by allocation counts, scans the growing graph
    again and again: half the load time of 12.5k inline entries. Nothing loading drops
    is cyclic (reference counting frees it), and a cycle left over is found by the
    next collection after loading."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _load_policy(
    path: Path, now: datetime | None, cache: ListCache | None, progress: Progress | None, ahead: _Ahead,
) -> Policy:
    now = now or now_utc()
    files = policy_files(path)
    root = policy_root(path)
    sources: dict[str, bytes] = {}
    problems: list[Problem] = []
    drafts: dict[str, _ServiceDraft] = {}
    settings: Settings | None = None
    settings_file: str | None = None
    expired: list[Entry] = []

    # Every file is read and its YAML loaded first, so that the lists the policy names
    # are parsed side by side (_Ahead), also while the models validate the files; the
    # problems keep each file's order.
    read = []
    checked: dict[str, Interval] = {}  # each inline CIDR the plain check parsed, for the entries
    for file in files:
        file_problems: list[Problem] = []
        read.append((file, _read_file(file, root, file_problems, sources, cache, checked), file_problems))
    ahead.start(read, root, cache)
    for file, content, file_problems in read:
        problems.extend(file_problems)
        spec = _validated(content, problems, cache) if isinstance(content, _Unvalidated) else content
        name = str(file)
        if spec is None:
            continue
        if spec.settings is not None:
            if settings_file is not None:
                problems.append(
                    Problem(name, spec.settings_line, "settings",
                            f"settings are already given in {settings_file}; keep them in one file")
                )
            else:
                values = dict(spec.settings)
                owners = values.pop("owners")
                settings = Settings(**values, owners=tuple(owners) if owners is not None else None)
                settings_file = name
        for service in spec.services:
            service_name, service_line = service.name, service.line
            if not SERVICE_NAME.fullmatch(service_name):
                problems.append(
                    Problem(name, service_line, f"services.{service_name}",
                            "service names are 1-24 characters of a-z, 0-9 and _, "
                            "starting with a letter")
                )
                continue
            draft = drafts.setdefault(
                service_name, _ServiceDraft(service_name, None, None, [], f"{name}:{service_line}")
            )
            if service.defines:
                if draft.defined_in is not None:
                    problems.append(
                        Problem(name, service_line, f"services.{service_name}",
                                f"service {service_name!r} is already defined in {draft.defined_in}; "
                                "define ports/protocols/action/widest/entry_counters/log in one file and only "
                                "add allow entries elsewhere")
                    )
                else:
                    draft.definition = service
                    draft.defined_in = f"{name}:{service_line}"
            for index, allow in enumerate(service.allow):
                origin = Origin(name, allow.line, f"services.{service_name}.allow[{index}]")
                for part in _expand_entry(allow, origin, file, root, problems, sources, cache, progress, ahead,
                                          checked):
                    if part.expires is not None and part.expires <= now:
                        expired.extend((part,) if isinstance(part, Entry) else part.entries)
                    else:
                        draft.entries.append(part)

    services = _finish_services(drafts, problems)
    if problems:
        raise PolicyError(problems)
    return Policy(
        services=tuple(services),
        settings=settings or Settings(),
        files=tuple(files),
        expired=tuple(expired),
        sources=sources,
    )


class _Unvalidated(Struct, frozen=True):
    """A policy file's YAML, loaded, that the models have yet to validate."""

    name: str
    sha256: str
    document: LocatedData


def _read_file(
    file: Path, root: Path, problems: list[Problem], sources: dict[str, bytes], cache: ListCache | None = None,
    checked: dict[str, Interval] | None = None,
) -> FileSpec | _Unvalidated | None:
    """The file as validated before, from the cache (which skips YAML and the models:
    most of an apply's start-up), else its YAML loaded and, when every value is plainly
    valid, validated; else its YAML for the models (_validated)."""
    name = str(file)
    try:
        raw = read_regular(file, root, MAX_POLICY_BYTES)
    except _Unreadable as exc:
        problems.append(Problem(name, None, "", f"cannot read: {exc}"))
        return None
    sources[name] = raw
    digest = hashlib.sha256(raw).hexdigest() if cache is not None else ""
    spec = cache.validated(digest) if cache is not None else None
    if spec is not None:
        return spec
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problems.append(Problem(name, line, "", "not UTF-8 text; save the file as UTF-8"))
        return None
    from hostwall.yamlsource import document

    loaded = document(name, text)
    if isinstance(loaded, Problem):
        problems.append(loaded)
        return None
    # A file whose values are all plainly valid needs neither the models nor pydantic's
    # import (hostwall.policyplain); the models validate the rest.
    from hostwall.policyplain import plain_file_spec

    spec = plain_file_spec(loaded, checked)
    if spec is None:
        return _Unvalidated(name, digest, loaded)
    if cache is not None:
        cache.keep_validated(digest, spec)
    return spec


def _validated(content: _Unvalidated, problems: list[Problem], cache: ListCache | None) -> FileSpec | None:
    from hostwall.policyfile import validate_document

    result = validate_document(content.name, content.document)
    if isinstance(result, list):
        problems.extend(result)
        return None
    if cache is not None:
        cache.keep_validated(content.sha256, result)
    return result


def _expand_entry(
    allow: AllowSpec, origin: Origin, policy_file: Path, root: Path, problems: list[Problem],
    sources: dict[str, bytes], cache: ListCache | None = None, progress: Progress | None = None,
    ahead: _Ahead | None = None, checked: dict[str, Interval] | None = None,
) -> list[Entry] | list[ListFile]:
    if allow.cidr is not None:
        expires = allow.expires.timestamp() if allow.expires is not None else PERMANENT
        known = checked.get(allow.cidr) if checked is not None else None
        if known is None:
            interval = parse_interval(allow.cidr, expires)
        else:
            interval = known if expires == known.expires else Interval(known.family, known.first, known.last, expires)
        return [Entry(interval, allow.owner, allow.reason, allow.review_by, allow.expires, origin, allow.broad_ok)]
    assert allow.file is not None
    list_path = (policy_file.parent / allow.file)
    read = ahead.reads.get(str(list_path)) if ahead is not None else None
    if read is None:
        try:
            data = read_regular(list_path, root, MAX_LIST_BYTES)
        except _Unreadable as exc:
            problems.append(Problem(origin.file, origin.line, origin.entry,
                                    f"cannot read list file {list_path}: {exc}"))
            return []
        digest = hashlib.sha256(data).hexdigest()
    else:
        data, digest = read
    sources[str(list_path)] = data
    parsed = cache.get(digest) if cache is not None else None
    if parsed is None:
        parsed = ahead.parsed(digest, _shown(progress, allow.file, data)) if ahead is not None else None
        previous = cache.latest(str(list_path)) if cache is not None and parsed is None else None
        if previous is not None:
            parsed = reparse_list(*previous, data)
        if parsed is None:
            parsed = _parse_list(data, problems, origin, list_path, allow.file, progress)
        if parsed is None:
            return []
        if cache is not None:
            cache.put(digest, parsed, data, str(list_path))
    label = f"{origin.entry} (file: {allow.file}, from {origin})"  # one string shared by every line
    return [ListFile(str(list_path), data, digest, parsed, allow.owner, allow.reason, allow.review_by,
                     allow.expires, label, allow.broad_ok, origin)]


class _Ahead:
    """The ``file:`` lists of a policy read once, and those the cache does not know
    parsed in forked children on the spare cores (hostwall.forked) while this process
    validates the policy files and parses the rest in the usual order. A list whose
    child failed, or that has a bad line, is parsed here as if no child had run, so
    results and errors never depend on one.
    """

    def __init__(self) -> None:
        self.reads: dict[str, tuple[bytes, str]] = {}  # list path -> (bytes, sha256), read once
        self._jobs: dict[str, tuple[Child, int]] = {}  # sha256 -> the child parsing it, its result's index
        self._children: list[Child] = []

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for child in self._children:
            child.stop()

    def start(self, read: list[tuple[Path, FileSpec | _Unvalidated | None, list[Problem]]], root: Path,
              cache: ListCache | None) -> None:
        lists: dict[str, tuple[bytes, Path]] = {}  # sha256 -> (bytes, path), in the order they are reached
        validating = any(isinstance(content, _Unvalidated) for _, content, _ in read)
        for file, content, _ in read:
            if isinstance(content, _Unvalidated):
                names = _named_lists(content.document.data)
            else:
                names = [a.file for service in (content.services if content else ()) for a in service.allow if a.file]
            for list_path in (file.parent / name for name in names):
                try:
                    data = read_regular(list_path, root, MAX_LIST_BYTES)
                except _Unreadable:
                    continue  # reported where the entry is expanded
                digest = hashlib.sha256(data).hexdigest()
                self.reads[str(list_path)] = (data, digest)
                if cache is None or not cache.knows(digest, str(list_path)):
                    lists.setdefault(digest, (data, list_path))
        # While this process validates files, every list goes to a child, one child more
        # than there are spare cores (validating is as long as parsing a list or two);
        # otherwise this process parses the first list itself as it comes to it.
        kept = 0 if validating else 1
        if len(lists) <= kept:
            return
        from hostwall import forked

        spare = forked.spare_cores()
        workers = min(spare + 1 - kept, len(lists) - kept)
        if spare < 1 or not forked.can_fork():
            return
        # Dealt largest first, each to the child with the fewest bytes so far.
        shares: list[list[str]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for digest in sorted(list(lists)[kept:], key=lambda d: -len(lists[d][0])):
            least = loads.index(min(loads))
            shares[least].append(digest)
            loads[least] += len(lists[digest][0])
        for share in shares:
            child = forked.start(functools.partial(_encoded_parses, [lists[digest] for digest in share]), len(share))
            if child is None:
                return
            self._children.append(child)
            self._jobs.update((digest, (child, index)) for index, digest in enumerate(share))

    def parsed(self, sha256: str, shown: Callable[[bool], None] = lambda done: None) -> ParsedList | None:
        """The list whose bytes have this sha256, parsed by a child; None when no child
        parsed it or the child failed or found a bad line. shown(done) is told before
        and after the wait for the child."""
        job = self._jobs.pop(sha256, None)
        if job is None:
            return None
        child, index = job
        shown(False)
        results = child.results()
        shown(True)
        if results is None or not results[index]:
            return None
        try:
            return ParsedList.decode(results[index])
        except ValueError:
            return None


def _shown(progress: Progress | None, name: str, data: bytes) -> Callable[[bool], None]:
    """A progress report of a list parsed by a child: nothing, then all of it. The lines
    are counted only if a child parsed the list: every apply passes a progress callback."""
    if progress is None:
        return lambda done: None

    total: list[int] = []  # counted at the first report, once

    def show(done: bool) -> None:
        if not total:
            total.append(data.count(b"\n"))
        progress(f"parsing {name}", total[0] if done else 0, total[0])

    return show


def _named_lists(data: object) -> list[str]:
    """The file: names an unvalidated document seems to hold: services.*.allow[*].file.
    A guess that validation confirms or drops; only time depends on it."""
    services = data.get("services") if isinstance(data, dict) else None
    names = []
    for service in services.values() if isinstance(services, dict) else ():
        allow = service.get("allow") if isinstance(service, dict) else None
        for entry in allow if isinstance(allow, list) else ():
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str):
                names.append(name)
    return names


def _encoded_parses(lists: list[tuple[bytes, Path]]) -> Iterator[bytes]:
    """_parse_list's result of each, encoded; empty for a list with a bad line (the parent
    parses that one again and reports it)."""
    for data, list_path in lists:
        parsed = _parse_list(data, [], Origin("", None, ""), list_path, "")
        yield b"" if parsed is None else parsed.encode()


def _list_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, CIDR) of each line of a list file that holds one."""
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if content:
            yield number, content


def _parse_list(
    data: bytes, problems: list[Problem], origin: Origin, list_path: Path, name: str,
    progress: Progress | None = None,
) -> ParsedList | None:
    """Every line parsed and checked; None (with the problems added) if any is bad."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        problems.append(Problem(origin.file, origin.line,
                                origin.entry, f"cannot read list file {list_path}: not UTF-8 text"))
        return None
    keys: dict[int, list[int]] = {4: [], 6: []}
    failed = False
    lines = text.splitlines()
    for start in range(0, len(lines), PROGRESS_LINES):
        if progress is not None and start:
            progress(f"parsing {name}", start, len(lines))
        for number, content in parse_list_lines(lines[start:start + PROGRESS_LINES], start + 1, keys[4], keys[6]):
            try:
                interval = parse_interval(content)
            except CidrError as exc:
                problems.append(Problem(str(list_path), number, f"{origin.entry} file: {name}", str(exc)))
                failed = True
                continue
            keys[interval.family].append(range_key(interval.family, interval.first, interval.last))
    count = len(keys[4]) + len(keys[6])
    if failed:
        return None
    records: dict[int, tuple[bytes, bytes | None]] = {}
    for family in (4, 6):
        records[family] = merged_records(family, keys[family])
    return ParsedList(count, records[4][0], records[6][0], records[4][1], records[6][1])


_BOM = b"\xef\xbb\xbf"


def _plain_lines(data: bytes) -> bool:
    """Whether cutting data at each LF gives the lines that str.splitlines() gives of its
    text: no byte-order mark, and no line boundary but LF and CR LF (no lone CR, VT, FF,
    FS, GS, RS, NEL, LS or PS)."""
    if data.startswith(_BOM) or any(c in data for c in (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e")):
        return False
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return False
    return data.isascii() or not any(c in data for c in (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9"))


def reparse_list(old: bytes, previous: ParsedList, new: bytes) -> ParsedList | None:
    """parse(new) computed from previous = parse(old), parsing only the lines that differ;
    None whenever that is not simple (then the caller parses new whole, which also
    reports any bad line exactly).

    The lines outside the window between the common prefix and suffix of old and new
    are the same lines, and were valid in old; the window's old lines that new lacks
    leave the sorted multiset of every line's interval, and its new ones join it. Only
    the merged ranges that held a removed line are merged again, from the lines left in
    them; the added lines are merged in like inline entries (IntervalSet.merged_with).
    """
    if not (_plain_lines(new) and _plain_lines(old)):
        return None
    head = common_bytes(old, new, from_end=False)
    tail = min(common_bytes(old, new, from_end=True), min(len(old), len(new)) - head)
    start = old.rfind(b"\n", 0, head) + 1
    old_end, new_end = old.find(b"\n", len(old) - tail), new.find(b"\n", len(new) - tail)
    old_end = len(old) if old_end < 0 else old_end
    new_end = len(new) if new_end < 0 else new_end
    # Edits scattered over a long list give a wide window but few lines that differ, and
    # only those are parsed.
    left, joined = _line_changes(old[start:old_end].split(b"\n"), new[start:new_end].split(b"\n"))
    try:
        gone = [parse_interval(text) for _, text in _list_lines(b"\n".join(left).decode())]
        came = [parse_interval(text) for _, text in _list_lines(b"\n".join(joined).decode())]
    except (UnicodeDecodeError, CidrError):
        return None
    updated: dict[int, tuple[bytes, bytes | None]] = {}
    for family in (4, 6):
        result = _update_family(
            family, previous.v4 if family == 4 else previous.v6, previous.lines(family),
            [(i.first, i.last) for i in gone if i.family == family],
            [(i.first, i.last) for i in came if i.family == family],
        )
        if result is None:
            return None
        updated[family] = result
    return ParsedList(previous.entries - len(gone) + len(came), updated[4][0], updated[6][0],
                      updated[4][1], updated[6][1])


def _line_changes(old_lines: list[bytes], new_lines: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Lines to take out of old and lines to put in, so that new holds, as a multiset,
    the lines of old less the first plus the second.

    Lines replaced in place (the same number of lines) are found by comparing position by
    position, and a few lines inserted or deleted here and there by walking both
    versions in step; anything else (a reordered or rewritten list) is the multisets'
    difference, as set differences when no line repeats. The bulk of each runs in C:
    subtracting Counters walks every distinct line in Python, about ten times as long for
    a window as wide as a 100k list.
    """
    if len(old_lines) == len(new_lines):
        changed = list(compress(range(len(old_lines)), map(ne, old_lines, new_lines)))
        if len(changed) <= len(old_lines) // 16:  # else the lines were reordered or rewritten
            return [old_lines[i] for i in changed], [new_lines[i] for i in changed]
    # Each edit restarts the walk at its place, which costs a pass over the lines before
    # it: past a few dozen edits the sets are cheaper.
    in_step = _edits_in_step(old_lines, new_lines, limit=64)
    if in_step is not None:
        return in_step
    old_set, new_set = set(old_lines), set(new_lines)
    if len(old_set) == len(old_lines) and len(new_set) == len(new_lines):
        return list(old_set - new_set), list(new_set - old_set)
    before, after = Counter(old_lines), Counter(new_lines)
    return list((before - after).elements()), list((after - before).elements())


# After an edit, the shifts tried to bring the two versions back in step (lines of old,
# lines of new skipped): one line replaced, inserted or deleted first, then runs of them.
_SHIFTS = ((1, 1), (0, 1), (1, 0), *((d, d) for d in range(2, 9)), *((0, d) for d in range(2, 9)),
           *((d, 0) for d in range(2, 9)))
_IN_STEP = 8  # lines that must agree after a shift


def _edits_in_step(old: list[bytes], new: list[bytes], limit: int) -> tuple[list[bytes], list[bytes]] | None:
    """(lines of old skipped, lines of new skipped) walking both in step, each stretch of
    equal lines compared in C; None once more than limit lines differ or no shift brings
    the two back in step. Whatever the shifts chosen, the lines passed over in step are
    equal pairs, so the result always turns old into new."""
    gone: list[bytes] = []
    came: list[bytes] = []
    i = j = 0
    while True:
        step = next(compress(count(), map(ne, islice(old, i, None), islice(new, j, None))), None)
        if step is None:  # equal up to the end of the shorter one
            rest = min(len(old) - i, len(new) - j)
            gone += old[i + rest:]
            came += new[j + rest:]
            return gone, came
        i, j = i + step, j + step
        for skip_old, skip_new in _SHIFTS:
            if (i + skip_old <= len(old) and j + skip_new <= len(new)
                    and old[i + skip_old:i + skip_old + _IN_STEP] == new[j + skip_new:j + skip_new + _IN_STEP]):
                break
        else:
            return None
        gone += old[i:i + skip_old]
        came += new[j:j + skip_new]
        i, j = i + skip_old, j + skip_new
        if len(gone) + len(came) > limit:
            return None


def _key(first: int, last: int, width: int) -> bytes:
    return first.to_bytes(width, "big") + last.to_bytes(width, "big")


def _splice(records: Records, remove: set[int], insert: list[bytes]) -> bytes:
    """records without the indices in remove and with the records in insert, in order."""
    events = sorted([(index, 0, b"") for index in remove]
                    + [(bisect.bisect_left(records, record), 1, record) for record in insert])
    chunks, cursor, size = [], 0, records.size
    for position, kind, record in events:
        chunks.append(records.data[cursor * size:position * size])
        if kind == 0:
            cursor = position + 1
        else:
            cursor = max(cursor, position)
            chunks.append(record)
    chunks.append(records.data[cursor * size:])
    return b"".join(chunks)


def _update_family(
    family: int, merged: bytes, lines: bytes, gone: list[tuple[int, int]], came: list[tuple[int, int]]
) -> tuple[bytes, bytes | None] | None:
    """(merged, lines or None) of one family after the lines gone left and came joined."""
    width = 4 if family == 4 else 16
    top = (1 << (8 * width)) - 1
    every = Records(lines, 2 * width)
    taken: set[int] = set()
    for first, last in gone:
        key = _key(first, last, width)
        index = bisect.bisect_left(every, key)
        while index in taken:  # the same line twice: its next copy
            index += 1
        if index >= len(every) or every[index] != key:
            return None
        taken.add(index)
    left = Records(_splice(every, taken, []), 2 * width)
    ranges = Records(merged, 2 * width)
    touched: set[int] = set()
    for first, last in gone:
        index = bisect.bisect_right(ranges, _key(first, top, width)) - 1
        if index < 0 or not (ranges.pair(index)[0] <= first and last <= ranges.pair(index)[1]):
            return None
        touched.add(index)
    pieces: list[bytes] = []
    for index in touched:
        low, high = ranges.pair(index)
        start = bisect.bisect_left(left, _key(low, 0, width))
        stop = bisect.bisect_right(left, _key(high, top, width))
        pieces.extend(_key(a, b, width) for a, b in merge_same_expiry([left.pair(i) for i in range(start, stop)]))
    rest = IntervalSet(family, _splice(ranges, touched, sorted(pieces)), ordered=True)
    result = rest.merged_with([Interval(family, first, last) for first, last in came]).ranges
    every_now = _splice(left, set(), sorted(_key(a, b, width) for a, b in came))
    return result, None if len(every_now) == len(result) else every_now


def _finish_services(drafts: dict[str, _ServiceDraft], problems: list[Problem]) -> list[Service]:
    services: list[Service] = []
    for name in sorted(set(drafts) | set(BUILTIN_SERVICES)):
        draft = drafts.get(name) or _ServiceDraft(name, None, None, [])
        builtin = BUILTIN_SERVICES.get(name)
        definition = draft.definition or ServiceSpec(name, None)
        ports: tuple[PortRange, ...] | None = (
            tuple(sorted(set(definition.ports))) if definition.ports else None
        )
        protocols = tuple(sorted(set(definition.protocols))) if definition.protocols else None
        if builtin is not None:
            ports = ports or builtin.ports
            protocols = protocols or builtin.protocols
        where = draft.defined_in or ("built-in" if builtin else draft.first_seen)
        if ports is None:
            problems.append(Problem(where, None, f"services.{name}",
                                    f"service {name!r} is not built-in, so it needs ports: [...] "
                                    "(built-in services: " + ", ".join(BUILTIN_SERVICES) + ")"))
            continue
        parts = draft.entries
        entries: Sequence[Entry] = (
            Entries(parts) if any(isinstance(p, ListFile) for p in parts)
            else tuple(p for p in parts if isinstance(p, Entry))
        )
        services.append(Service(
            name=name,
            ports=ports,
            protocols=protocols or ("tcp",),
            action=definition.action or "drop",
            entries=entries,
            defined_in=where,
            widest=Widest(*definition.widest) if definition.widest else Widest(),
            entry_counters=bool(definition.entry_counters),
            listed=name in drafts,
            log=definition.log,
        ))
    _check_port_claims(services, problems)
    return services


def _check_port_claims(services: list[Service], problems: list[Problem]) -> None:
    claims: list[tuple[Protocol, PortRange, Service]] = []
    # Built-ins claim first, so a clash is reported at the custom service that the
    # operator can change, not at a built-in that has no file.
    for service in sorted(services, key=lambda s: s.name not in BUILTIN_SERVICES):
        for protocol in service.protocols:
            for ports in service.ports:
                for other_protocol, other_ports, other in claims:
                    overlap = ports.first <= other_ports.last and other_ports.first <= ports.last
                    if other is not service and other_protocol == protocol and overlap:
                        problems.append(Problem(
                            service.defined_in, None, f"services.{service.name}",
                            f"port {ports}/{protocol} is also claimed by service {other.name!r} "
                            f"({other.defined_in}); a port belongs to one service, so add the "
                            f"entries to {other.name!r} or pick another port",
                        ))
                claims.append((protocol, ports, service))
