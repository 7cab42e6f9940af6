"""A prober without a kernel: it answers as a correct replica of a ruleset would, for
unit tests of everything around the replica."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from msgspec import Struct

from hostwall.ruleset import Ruleset
from hostwall.verify.probes import Probe

_MAPPED = (0xFFFF << 32, (0xFFFF << 32) | 0xFFFFFFFF)


class FakeProber(Struct):
    ruleset: Ruleset
    sent: int = 0

    def observe(self, probes: Sequence[Probe]) -> list[bool]:
        self.sent += len(probes)
        return [self._answers(probe) for probe in probes]

    def _answers(self, probe: Probe) -> bool:
        rules = self.ruleset.service(probe.target.service) if probe.target.service else None
        if rules is None:
            return True
        if probe.family == 6 and _MAPPED[0] <= probe.address <= _MAPPED[1]:
            return False
        return any(i.contains(probe.address) for i in rules.intervals(probe.family))

    @contextmanager
    def opened(self, destination: dict[int, str], tcp_ports: Sequence[int],
               udp_ports: Sequence[int]) -> Iterator[FakeProber]:
        yield self
