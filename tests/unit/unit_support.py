"""Types shared by the unit tests. A module of its own: each test directory has a
conftest.py, so `from conftest import ...` would find whichever was imported first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WriteFiles = Callable[[dict[str, str | bytes]], Path]  # the write_files fixture
