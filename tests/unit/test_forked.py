"""Work in forked children: results come back in order, and every way a child can fail
gives None (the caller then does the work itself) and leaves no process behind."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest
from unit_support import reaped

from hostwall import forked


def test_a_child_sends_its_results_in_order() -> None:
    parent = os.getpid()
    child = forked.start(lambda: [str(os.getpid() != parent).encode(), b"", b"x" * 300_000], 3)
    assert child is not None
    pid = child.pid
    assert child.results() == [b"True", b"", b"x" * 300_000]
    assert reaped(pid)
    assert child.results() == [b"True", b"", b"x" * 300_000]  # taken once, kept


def failing() -> Iterator[bytes]:
    yield b"first"
    raise RuntimeError("broken")


def killed() -> Iterator[bytes]:
    yield b"first"
    os.kill(os.getpid(), signal.SIGKILL)
    yield b"never"


@pytest.mark.parametrize(("work", "count"), [
    (failing, 2),
    (killed, 2),
    (lambda: [b"one"], 2),  # fewer results than promised
    (lambda: [b"one", b"two", b"three"], 2),  # more
])
def test_a_child_that_fails_gives_none(work: forked.Work, count: int) -> None:
    child = forked.start(work, count)
    assert child is not None
    pid = child.pid
    assert child.results() is None
    assert reaped(pid)


def test_a_child_whose_results_are_not_taken_is_killed_and_reaped() -> None:
    gate_reader, gate_writer = os.pipe()

    def waits() -> list[bytes]:
        os.read(gate_reader, 1)  # until the parent writes, which it never does
        return [b"late"]

    with forked.children() as started:
        child = forked.start(waits, 1)
        assert child is not None
        started.append(child)
        pid = child.pid
    assert reaped(pid)
    os.close(gate_reader)
    os.close(gate_writer)


def test_no_child_while_another_thread_runs() -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(30,))
    other.start()
    try:
        assert not forked.can_fork()
        assert forked.start(lambda: [b"x"], 1) is None
    finally:
        release.set()
        other.join()
    assert forked.can_fork()


def test_no_child_when_fork_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    before = len(os.listdir("/proc/self/fd"))
    assert forked.start(lambda: [b"x"], 1) is None
    assert len(os.listdir("/proc/self/fd")) == before  # the pipe is closed again
