"""Types shared by the unit tests. A module of its own: each test directory has a
conftest.py, so `from conftest import ...` would find whichever was imported first."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

WriteFiles = Callable[[dict[str, str | bytes]], Path]  # the write_files fixture

# The moment the `pinned_clock` fixture holds hostwall's clock at. Dates a test writes
# are relative to it, so no test result depends on the day the suite runs.
PINNED_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def damage(path: Path, how: str) -> None:
    """A cache file damaged as a crash or a disk would: one bit flipped in the middle
    ("flip") or its end cut off ("truncate")."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 1
    elif how == "truncate":
        del data[-5:]
    else:
        raise ValueError(how)
    path.write_bytes(bytes(data))


def reaped(pid: int) -> bool:
    """Whether the child pid has been waited for (and so left no zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def refuse_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a policy file is validated (it should come from the cache): a file
    is validated, by policyplain or the models, only once its YAML is loaded."""
    import hostwall.yamlsource

    def refuse(name: str, text: str) -> object:
        raise AssertionError(f"validated {name} again although its bytes were cached")

    monkeypatch.setattr(hostwall.yamlsource, "document", refuse)
