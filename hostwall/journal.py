"""The journald adapter: the only module that imports systemd.journal."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from msgspec import Struct

from hostwall.drops import Record
from hostwall.errors import HostwallError
from hostwall.text import printable

SYSLOG_IDENTIFIER = "hostwall"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
TRUSTED_WRITER = {"_UID": "0", "_TRANSPORT": "journal"}


class JournalUnavailable(HostwallError):
    exit_code = 1


class JournalSink:
    """Writes records to journald; while it is unreachable, writes one line per record
    to stderr instead (under systemd that is the journal again) and retries journald
    every few seconds. Nothing is buffered, so memory stays bounded."""

    def __init__(self, extra_fields: dict[str, str] | None = None, fallback: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, retry_seconds: float = 2.0,
                 socket_path: Path = JOURNAL_SOCKET) -> None:
        from systemd import journal

        self._send = journal.send
        self._extra = dict(extra_fields or {})
        self._fallback = fallback or sys.stderr
        self._clock = clock
        self._retry_seconds = retry_seconds
        self._socket_path = socket_path
        self._down_since: float | None = None
        self.fallback_records = 0

    @property
    def available(self) -> bool:
        return self._down_since is None

    def send(self, record: Record) -> None:
        now = self._clock()
        if self._down_since is None or now - self._down_since >= self._retry_seconds:
            try:
                # libsystemd reports success and drops the record when the socket does
                # not exist (journald never started, or gone with its runtime directory).
                if not os.path.exists(self._socket_path):
                    raise FileNotFoundError(self._socket_path)
                # Fields carry data (interface names, policy text): escaped, so that a
                # record is one line in `journalctl` and on a terminal.
                fields = {key: printable(value) for key, value in {**self._extra, **record.fields}.items()}
                self._send(
                    MESSAGE=printable(record.message), MESSAGE_ID=record.message_id, PRIORITY=str(record.priority),
                    SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER, **fields,
                )
                self._down_since = None
                return
            except OSError:
                self._down_since = now
        self.fallback_records += 1
        print(f"hostwall: {printable(record.message)}", file=self._fallback, flush=True)


class JournalEntry(Struct, frozen=True):
    timestamp: float
    message_id: str
    message: str
    fields: dict[str, str]


def _matching_reader(message_ids: tuple[str, ...], matches: dict[str, str] | None) -> Any:
    """A journal reader of hostwall's records with these message ids and field values."""
    from systemd import journal

    try:
        reader = journal.Reader()
    except OSError as exc:
        raise JournalUnavailable(f"cannot open the journal: {exc}") from exc
    reader.add_match(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    # Anyone may write a record that says SYSLOG_IDENTIFIER=hostwall (logger --journald);
    # _UID and _TRANSPORT are set by journald from the sender's socket credentials, so
    # only what a root process sent through the native protocol counts, as the agent
    # (run as root by its unit) does.
    for key, value in TRUSTED_WRITER.items():
        reader.add_match(**{key: value})
    for key, value in (matches or {}).items():
        reader.add_match(**{key: value})
    # Matches on different fields are ANDed, values of the same field ORed.
    for message_id in message_ids:
        reader.add_match(MESSAGE_ID=message_id)
    return reader


def read_entries(
    *, message_ids: tuple[str, ...], since: float | None = None, matches: dict[str, str] | None = None,
    follow: bool = False, poll_seconds: float = 1.0, stop: Callable[[], bool] = lambda: False,
) -> Iterator[JournalEntry]:
    reader = _matching_reader(message_ids, matches)
    if since is not None:
        reader.seek_realtime(since)
    while True:
        entry = reader.get_next()
        if entry:
            if _trusted(entry):
                yield _entry(entry)
            continue
        if not follow or stop():
            return
        reader.wait(int(poll_seconds * 1_000_000))


def read_last(*, message_ids: tuple[str, ...], count: int, matches: dict[str, str] | None = None,
              since: float | None = None) -> list[JournalEntry]:
    """The newest count matching records (oldest first), read backwards from the end, so
    that a day of flood records costs nothing."""
    reader = _matching_reader(message_ids, matches)
    reader.seek_tail()
    found: list[JournalEntry] = []
    while len(found) < count:
        raw = reader.get_previous()
        if not raw:
            break
        entry = _entry(raw)
        if since is not None and entry.timestamp < since:
            break
        if _trusted(raw):
            found.append(entry)
    return found[::-1]


def _trusted(raw: dict[str, Any]) -> bool:
    """The match already says so; checked again on what was read, since a reader's
    matches are easy to lose in a later edit and a forged drop is shown as a real one."""
    return all(str(raw.get(key)) == value for key, value in TRUSTED_WRITER.items())


def _entry(raw: dict[str, Any]) -> JournalEntry:
    stamp = raw.get("__REALTIME_TIMESTAMP")
    timestamp = stamp.timestamp() if stamp is not None else 0.0
    fields = {k: str(v) for k, v in raw.items() if k.startswith("HOSTWALL_")}
    message_id = raw.get("MESSAGE_ID")
    return JournalEntry(timestamp, str(getattr(message_id, "hex", message_id)),
                        str(raw.get("MESSAGE", "")), fields)
