"""Pure work done in forked children on the spare cores, while the caller goes on.

A child starts as a copy of the caller: it needs no interpreter start-up and no input
sent to it (the data is already in its memory), and it sends back only bytes, through
a pipe. Nothing a child does can change what the caller computes: whatever goes wrong
in it (an exception, a signal, a short write, a fork that fails) makes its results
None, and the caller does that work itself, as it would without children.

Children are made only while the process has a single thread: a fork copies no other
thread, so a lock another thread held (a progress display's, the output's) would stay
held in the child for ever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Iterator

_LENGTH = struct.Struct("<Q")
Work = Callable[[], Iterable[bytes]]


def spare_cores() -> int:
    """The cores this process may run on besides the one it runs on."""
    try:
        return len(os.sched_getaffinity(0)) - 1
    except (AttributeError, OSError):  # pragma: no cover - Linux has it
        return 0


def can_fork() -> bool:
    return hasattr(os, "fork") and threading.active_count() == 1


class Child:
    """A forked child computing a list of byte strings."""

    def __init__(self, pid: int, reader: int, count: int) -> None:
        self.pid = pid
        self._reader: int | None = reader
        self._count = count
        self._results: list[bytes] | None = None

    def results(self) -> list[bytes] | None:
        """The child's results, in order (waiting for it); None when it failed."""
        if self._reader is None:
            return self._results
        reader, self._reader = self._reader, None
        data: bytes | None = None
        try:
            with open(reader, "rb") as stream:
                data = stream.read()
        except OSError:
            os.kill(self.pid, signal.SIGKILL)  # it may be stuck writing to the pipe given up on
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if os.waitstatus_to_exitcode(status) == 0 and data is not None:
            self._results = _frames(data, self._count)
        return self._results

    def stop(self) -> None:
        """Kill and reap the child unless its results were taken."""
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def _frames(data: bytes, count: int) -> list[bytes] | None:
    results, offset = [], 0
    while offset + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            return None
        results.append(data[offset:offset + size])
        offset += size
    return results if offset == len(data) and len(results) == count else None


def start(work: Work, count: int) -> Child | None:
    """A child that sends what work() yields (count byte strings); None when no child
    can be made, and the caller does the work itself."""
    if not can_fork():
        return None
    reader, writer = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(reader)
        os.close(writer)
        return None
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        status = 1
        try:
            os.close(reader)
            with open(writer, "wb", closefd=True) as stream:
                for item in work():
                    stream.write(_LENGTH.pack(len(item)))
                    stream.write(item)
            status = 0
        finally:
            # No atexit handlers, no flush of the parent's buffered output a second time.
            os._exit(status)
    os.close(writer)
    return Child(pid, reader, count)


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Children started into the list are killed and reaped on the way out, also when
    the caller fails or is interrupted before it took their results."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            child.stop()
