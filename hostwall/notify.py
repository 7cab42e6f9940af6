"""systemd's notification protocol (sd_notify): the only importer of systemd.daemon."""

from __future__ import annotations

import os
import time


class Notifier:
    """READY/RELOADING/STOPPING/STATUS/WATCHDOG for Type=notify; a no-op outside systemd."""

    def __init__(self) -> None:
        from systemd import daemon

        self._notify = daemon.notify
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 1_000_000 / 2 if usec.isdigit() and int(usec) > 0 and mine else None
        )

    def send(self, *lines: str) -> None:
        self._notify("\n".join(lines))

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd 253+ wants MONOTONIC_USEC with RELOADING=1 to match the reload to a request.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
