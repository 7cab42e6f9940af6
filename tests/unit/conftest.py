"""Shared helpers for the unit tests: writing policy trees into tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from unit_support import WriteFiles


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
