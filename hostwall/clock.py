"""The one wall clock that every date comparison reads.

Expiry, review windows, confirmation deadlines, `drops --since` and the timestamps of
generations all ask `now()`. The CLI and the agent read it from here, so a test pins
one source (`pinned`) instead of patching every module that compares with a date.
Intervals (timeouts, rate windows, lock waits) use time.monotonic and never this clock:
a wall clock can jump.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

_source: Callable[[], float] = time.time


def now() -> float:
    """Seconds since the epoch (UTC), from the current source."""
    return _source()


def now_utc() -> datetime:
    return datetime.fromtimestamp(_source(), UTC)


class PinnedClock:
    """A wall clock that moves only when told to."""

    def __init__(self, moment: float) -> None:
        self.moment = moment

    def __call__(self) -> float:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += seconds

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.moment, UTC)


@contextmanager
def pinned(moment: datetime | float) -> Iterator[PinnedClock]:
    """Every reader of `now()` sees `moment` (an aware datetime or epoch seconds) until exit."""
    global _source  # noqa: PLW0603 - the single injection point is the point of this module
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            raise ValueError("a pinned moment needs a time zone")
        moment = moment.timestamp()
    clock = PinnedClock(float(moment))
    previous, _source = _source, clock
    try:
        yield clock
    finally:
        _source = previous
