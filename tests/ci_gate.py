"""One rule for tests that need root or system tools: skip on a developer's machine,
fail in CI, where a skip would hide that the real kernel or service was never asked."""

from __future__ import annotations

import os

import pytest


def skip_or_fail_in_ci(reason: str | None, what: str) -> None:
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must execute {what}, never skip them: {reason}", pytrace=False)
    pytest.skip(reason)
