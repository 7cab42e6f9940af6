"""Shared fixtures for the unit tests: policy trees in tmp_path, a pinned clock, and the
clock-shift guard.

The guard: with HOSTWALL_TEST_CLOCK_SHIFT set (e.g. 45d, 400d, 5y), the whole process
runs that far in the future (time-machine moves time.time, datetime.now and date.today;
the monotonic clock stays). `make test` runs the unit tests that way as well, so a date
written into a test that will expire fails today, not on the day it expires. Tests that
start tools whose own clock would not move (subprocesses) carry the `real_clock` marker
and are left out of the shifted runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from unit_support import PINNED_NOW, WriteFiles

from hostwall import clock

SHIFT_VARIABLE = "HOSTWALL_TEST_CLOCK_SHIFT"


def parse_shift(text: str) -> timedelta:
    match = re.fullmatch(r"([0-9]+)([dy])", text)
    if not match:
        raise pytest.UsageError(f"{SHIFT_VARIABLE}={text!r}: use e.g. 45d or 5y")
    return timedelta(days=int(match[1]) * (365 if match[2] == "y" else 1))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_clock: starts a subprocess whose clock a shifted run cannot move")
    shift = os.environ.get(SHIFT_VARIABLE)
    if not shift:
        return
    import time_machine

    traveller = time_machine.travel(datetime.now(UTC) + parse_shift(shift), tick=True)
    traveller.start()
    config.add_cleanup(traveller.stop)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(SHIFT_VARIABLE):
        return
    kept = [item for item in items if item.get_closest_marker("real_clock") is None]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def pytest_report_header() -> str | None:
    shift = os.environ.get(SHIFT_VARIABLE)
    return f"clock shifted ahead by {shift}: now {datetime.now(UTC):%Y-%m-%d}" if shift else None


@pytest.fixture
def pinned_clock() -> Iterator[clock.PinnedClock]:
    """hostwall's clock (every command's "now") held at PINNED_NOW for the test."""
    with clock.pinned(PINNED_NOW) as pinned:
        yield pinned


@pytest.fixture
def write_files(tmp_path: Path) -> WriteFiles:
    """Write {relative name: text or bytes} under tmp_path/policy and return that directory."""
    root = tmp_path / "policy"

    def write(files: dict[str, str | bytes]) -> Path:
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return root

    return write
