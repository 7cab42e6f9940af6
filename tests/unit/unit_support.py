"""Types shared by the unit tests. A module of its own: each test directory has a
conftest.py, so `from conftest import ...` would find whichever was imported first."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

WriteFiles = Callable[[dict[str, str | bytes]], Path]  # the write_files fixture

# The moment the `pinned_clock` fixture holds hostwall's clock at. Dates a test writes
# are relative to it, so no test result depends on the day the suite runs.
PINNED_NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
