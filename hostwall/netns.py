"""Entering a named network namespace (``ip netns`` style) for the calling thread.

setns(2) moves only the calling thread, and a netlink socket stays in the namespace
it was created in; the adapters create their sockets and make their calls inside
``entered()`` so that ``--netns`` confines every kernel interaction.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hostwall.errors import NetnsNotFound, PermissionDenied

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


@functools.cache
def _libc() -> Any:
    # ctypes is loaded only for --netns, once: it costs about 2 ms of every start.
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    import ctypes

    if _libc().setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        if errno == 1:
            raise PermissionDenied("entering a network namespace needs CAP_SYS_ADMIN (run as root)")
        raise OSError(errno, os.strerror(errno))


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise NetnsNotFound(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    if name is None:
        yield
        return
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsNotFound(
            f"network namespace {name!r} does not exist (see `ip netns list`)"
        ) from None
    except PermissionError:
        raise PermissionDenied(f"cannot open {path}: run as root") from None
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)
