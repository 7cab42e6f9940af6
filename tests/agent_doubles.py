"""Stand-ins for what the agent talks to besides the kernel, for tests that run an agent
in-process: systemd's notify socket and the journal."""

from __future__ import annotations

from hostwall.drops import Record


class SilentNotifier:
    """What systemd would be told; nothing of it is asserted."""

    watchdog_interval: float | None = None

    def ready(self, status: str) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def status(self, text: str) -> None: ...
    def watchdog(self) -> None: ...


class RecordingSink:
    """A journal that keeps the records it is sent."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def send(self, record: Record) -> None:
        self.records.append(record)
