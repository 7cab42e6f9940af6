"""The long-running agent: streams the kernel's drop logs into the journal."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hostwall import netns
from hostwall.drops import Drop, DropReporter, Record, lost_record, service_of
from hostwall.nflog import ReadResult
from hostwall.packet import PacketError, decode


class PacketSource(Protocol):
    def read(self, timeout: float) -> ReadResult: ...


class RecordSink(Protocol):
    def send(self, record: Record) -> None: ...


class InterfaceNames:
    """ifindex -> name inside the namespace the packets arrived in, cached briefly
    (interfaces come and go, and a name lookup is a syscall per packet otherwise)."""

    def __init__(self, netns_name: str | None, clock: Callable[[], float] = time.monotonic,
                 ttl: float = 30.0) -> None:
        self._netns = netns_name
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[int, tuple[str, float]] = {}

    def __call__(self, ifindex: int | None) -> str:
        if ifindex is None:
            return "?"
        cached = self._cache.get(ifindex)
        now = self._clock()
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        try:
            with netns.entered(self._netns):
                name = socket.if_indextoname(ifindex)
        except OSError:
            name = f"if{ifindex}"
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[ifindex] = (name, now)
        return name


@dataclass
class StreamStats:
    packets: int = 0
    records: int = 0
    lost: int = 0
    undecodable: int = 0
    by_service: dict[str, int] = field(default_factory=dict)


class DropStreamer:
    def __init__(
        self,
        source: PacketSource,
        sink: RecordSink,
        reporter: DropReporter,
        interfaces: Callable[[int | None], str],
        generation: Callable[[], int | None],
    ) -> None:
        self._source = source
        self._sink = sink
        self._reporter = reporter
        self._interfaces = interfaces
        self._generation = generation
        self.stats = StreamStats()

    def step(self, timeout: float) -> None:
        result = self._source.read(timeout)
        if result.lost:
            self.stats.lost += result.lost
            self._emit([lost_record(result.lost, self.stats.lost)])
        generation = self._generation() if result.packets else None
        for logged in result.packets:
            service = service_of(logged.prefix)
            if service is None:
                continue  # another tool logging to the same group
            self.stats.packets += 1
            self.stats.by_service[service] = self.stats.by_service.get(service, 0) + 1
            try:
                packet = decode(logged.payload)
            except PacketError:
                self.stats.undecodable += 1
                continue
            drop = Drop(service, packet, self._interfaces(logged.ifindex), generation)
            self._emit(self._reporter.observe(drop))
        self._emit(self._reporter.flush())

    def finish(self) -> None:
        self._emit(self._reporter.flush_all())

    def _emit(self, records: list[Record]) -> None:
        for record in records:
            self._sink.send(record)
            self.stats.records += 1


def run_streamer(streamer: DropStreamer, stop: threading.Event, poll: float = 0.2) -> None:
    """Until stop is set; each read waits at most poll seconds, so stop is seen quickly."""
    try:
        while not stop.is_set():
            streamer.step(poll)
    finally:
        streamer.finish()
