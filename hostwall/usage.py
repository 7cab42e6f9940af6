"""Which allow entries carried packets: the kernel's per-entry counters, read for audit."""

from __future__ import annotations

from hostwall.audit import Usage
from hostwall.engine import Engine
from hostwall.policy import Policy
from hostwall.state import StateDir


def kernel_usage(engine: Engine, state: StateDir, policy: Policy) -> tuple[Usage | None, str | None]:
    """Evidence from the kernel, or None and why there is none."""
    return None, "the kernel's sets keep no per-entry counters"
