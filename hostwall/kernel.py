"""What the adapters report about the kernel's hostwall table, as plain data."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from msgspec import Struct, field

from hostwall.cidr import Interval
from hostwall.ruleset import Delta, Ruleset

COMMENT_PATTERN = re.compile(r"hostwall generation=(\d+) sha256=([0-9a-f]{64})")


class Counter(Struct, frozen=True):
    packets: int
    bytes: int


class KernelTable(Struct, frozen=True):
    """The hostwall table as listed from the kernel.

    ``structure`` is a fingerprint of everything but set elements and counter values;
    it is recorded after each apply and compared later to detect edits made behind
    hostwall's back. ``sets`` is None when elements were not read.
    """

    comment: str | None
    structure: str
    counters: dict[str, Counter] = field(default_factory=dict)
    sets: dict[str, Sequence[Interval]] | None = None
    marker: int | None = None
    # Packets per element (by first and last address) of the sets declared with a
    # counter; read with the elements.
    element_packets: dict[str, dict[tuple[int, int], int]] | None = None

    @property
    def generation(self) -> int | None:
        """The generation loaded: the marker element, which deltas move forward."""
        return self.marker if self.marker is not None else self.base_generation

    @property
    def base_generation(self) -> int | None:
        """The generation whose full load wrote the label (deltas cannot change it)."""
        match = COMMENT_PATTERN.fullmatch(self.comment or "")
        return int(match[1]) if match else None

    @property
    def digest(self) -> str | None:
        match = COMMENT_PATTERN.fullmatch(self.comment or "")
        return match[2] if match else None


class Backend(Protocol):
    """The kernel as hostwall sees it: one table, replaced by whole transactions."""

    def submit(self, transaction: str) -> None:
        """Run one transaction; on any error nothing of it is applied."""

    def load(self, ruleset: Ruleset, generation: int, now: float,
             before_commit: Callable[[], None] = lambda: None) -> None:
        """A full load of ruleset as generation: the transaction submit() would run for
        render_full_load(ruleset, generation, now), however it is sent. before_commit
        runs once, after the transaction is built and before the kernel can hold any of
        it; when it raises, nothing is sent."""

    def read_table(self, *, elements: bool) -> KernelTable | None:
        """The hostwall table, or None when the kernel has none. Without elements it is cheap."""

    def apply_delta(self, delta: Delta, now: float) -> None:
        """Change set elements in one batch, only if the kernel holds delta.from_generation."""

    def close(self) -> None:
        """Release what it holds of the kernel (netlink sockets); it is not used after."""
