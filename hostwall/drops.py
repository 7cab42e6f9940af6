"""From logged packets to journal records: wording, fields, flood control and the
reconnaissance warning. Pure: the clock comes in, records go out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from msgspec import Struct, field

from hostwall.packet import PacketSummary
from hostwall.ruleset import LOG_PREFIX, SPOOFED_SUFFIX

# Fixed identifiers, explained in units/hostwall.catalog (journalctl -x shows the text).
MESSAGE_ID_DROP = "2eb1441f6d4749cf97f970fefa489cad"
MESSAGE_ID_DROP_SUMMARY = "fc2695df0e2d4019b26e71d9c7b194d1"
MESSAGE_ID_RECON = "4efdc5fe01524c88995591f589206465"
MESSAGE_ID_LOST = "12db319d3b0143c59bcb24f046d0511f"
MESSAGE_ID_AGENT = "8c38560b2c854a84b9b516ac6047f605"
MESSAGE_ID_DRIFT = "83e14c7081b649a58ea0a1961cfd7ad4"
MESSAGE_ID_POLICY = "d28bf0b341c040eb86f3a698446833f6"
MESSAGE_ID_CHANGE = "a40f18c7e80045f6b257e146683cb6a8"
MESSAGE_ID_REVERTED = "5f0e3c0d9b6a4f1e8a3d2c7b41e9a6d2"
MESSAGE_ID_VERIFY = "e7aafab451634589bf5669afb3deb5a1"

PRIORITY_WARNING = 4
PRIORITY_NOTICE = 5
PRIORITY_INFO = 6


class Record(Struct, frozen=True):
    message: str
    message_id: str
    priority: int
    fields: dict[str, str] = field(default_factory=dict)


class Drop(Struct, frozen=True):
    service: str
    packet: PacketSummary
    interface: str
    generation: int | None
    reason: str = "not-allowed"  # or "spoofed-source": strict_source's reverse-path check


class FloodControl(Struct, frozen=True):
    window_seconds: float = 10.0
    records_per_source_per_window: int = 5  # then one summary per window
    recon_drops_per_minute: int = 60
    max_sources: int = 10_000  # memory bound; the oldest source is summarised and forgotten


def reverted_record(generation: int, revert_to: int | None, reason: str, by: str) -> Record:
    """The record of an unconfirmed change rolled back at its deadline (by the detached
    reverter or the agent)."""
    target = f"generation {revert_to}" if revert_to is not None else "no hostwall table"
    fields = {"HOSTWALL_GENERATION": str(generation), "HOSTWALL_REVERT_TO": str(revert_to or "none"),
              "HOSTWALL_REVERTED_BY": by, "HOSTWALL_REASON": reason}
    return Record(f"generation {generation} was not confirmed in time ({reason}); rolled back to {target}",
                  MESSAGE_ID_REVERTED, PRIORITY_WARNING, fields)


def service_of(prefix: str) -> str | None:
    logged = origin_of(prefix)
    return logged[0] if logged else None


def origin_of(prefix: str) -> tuple[str, str] | None:
    """(service, reason) of a hostwall log prefix; None for another tool's prefix."""
    if not prefix.startswith(LOG_PREFIX):
        return None
    service = prefix[len(LOG_PREFIX):]
    if service.endswith(SPOOFED_SUFFIX):
        return service[:-len(SPOOFED_SUFFIX)], "spoofed-source"
    return service, "not-allowed"


def _endpoint(address: str, port: int | None) -> str:
    shown = f"[{address}]" if ":" in address else address
    return f"{shown}:{port}" if port is not None else address


def drop_fields(drop: Drop) -> dict[str, str]:
    packet = drop.packet
    fields = {
        "HOSTWALL_SERVICE": drop.service,
        "HOSTWALL_SRC": packet.src,
        "HOSTWALL_DST": packet.dst,
        "HOSTWALL_PROTO": packet.protocol,
        "HOSTWALL_IIF": drop.interface,
        "HOSTWALL_REASON": drop.reason,
    }
    if packet.src_port is not None:
        fields["HOSTWALL_SRC_PORT"] = str(packet.src_port)
    if packet.dst_port is not None:
        fields["HOSTWALL_DPORT"] = str(packet.dst_port)
    if drop.generation is not None:
        fields["HOSTWALL_GENERATION"] = str(drop.generation)
    if packet.fragment:
        fields["HOSTWALL_FRAGMENT"] = "1"
    return fields


# Journal fields are text; these hold counts and numbers, which --json gives as numbers.
NUMERIC_FIELDS = frozenset({
    "HOSTWALL_SRC_PORT", "HOSTWALL_DPORT", "HOSTWALL_GENERATION", "HOSTWALL_COUNT", "HOSTWALL_FRAGMENT",
    "HOSTWALL_DROPS_PER_MINUTE", "HOSTWALL_LOST", "HOSTWALL_LOST_TOTAL",
})


def typed_fields(fields: dict[str, str]) -> dict[str, str | int]:
    """A record's fields with the numeric ones as integers (text that is not a plain
    number, written by someone else, stays text rather than failing the listing)."""
    return {name: int(value) if name in NUMERIC_FIELDS and value.isascii() and value.isdigit() else value
            for name, value in fields.items()}


class _Source(Struct):
    window_start: float
    in_window: int = 0
    # Suppressed drops by service, each with the latest drop as the summary's example:
    # `hostwall drops --top/--service` add HOSTWALL_COUNT up by source and service, so a
    # summary must not count one service's drops under another's name.
    suppressed: dict[str, tuple[int, Drop]] = field(default_factory=dict)
    minute_start: float = 0.0
    in_minute: int = 0
    warned_minute: float | None = None


class DropReporter:
    """Turns drops into records; a flooding source gets one summary per window instead
    of a record per packet, and the counts of all records add up to the drops seen."""

    def __init__(self, control: FloodControl, clock: Callable[[], float]) -> None:
        self._control = control
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def observe(self, drop: Drop) -> list[Record]:
        now = self._clock()
        records = self._roll(now)
        key = drop.packet.src
        source = self._sources.get(key)
        if source is None:
            if len(self._sources) >= self._control.max_sources:
                _, oldest = self._sources.popitem(last=False)
                records.extend(_summary(oldest))
            source = self._sources[key] = _Source(window_start=now, minute_start=now)
        self._sources.move_to_end(key)
        source.in_window += 1
        if source.in_window <= self._control.records_per_source_per_window:
            records.append(self._drop_record(drop))
        else:
            count, _ = source.suppressed.get(drop.service, (0, drop))
            source.suppressed[drop.service] = (count + 1, drop)
        if now - source.minute_start >= 60:
            source.minute_start, source.in_minute = now, 0
        source.in_minute += 1
        if source.in_minute > self._control.recon_drops_per_minute and source.warned_minute != source.minute_start:
            source.warned_minute = source.minute_start
            records.append(_recon(drop, source.in_minute))
        return records

    def flush(self) -> list[Record]:
        """Summaries of windows that have ended (call periodically, and once at exit with
        everything: see flush_all)."""
        return self._roll(self._clock())

    def flush_all(self) -> list[Record]:
        records = []
        for source in self._sources.values():
            records.extend(_summary(source))
            source.suppressed = {}
        return records

    def _roll(self, now: float) -> list[Record]:
        records = []
        for source in self._sources.values():
            if now - source.window_start >= self._control.window_seconds:
                records.extend(_summary(source))
                source.window_start, source.in_window, source.suppressed = now, 0, {}
        return records

    @staticmethod
    def _drop_record(drop: Drop) -> Record:
        packet = drop.packet
        fields = drop_fields(drop)
        fields["HOSTWALL_COUNT"] = "1"
        return Record(
            message=(f"dropped {packet.protocol} {_endpoint(packet.src, packet.src_port)} -> "
                     f"{_endpoint(packet.dst, packet.dst_port)} service={drop.service} iface={drop.interface}"
                     + (" (spoofed source: fails the reverse-path check)" if drop.reason == "spoofed-source" else "")),
            message_id=MESSAGE_ID_DROP,
            priority=PRIORITY_NOTICE,
            fields=fields,
        )


def _summary(source: _Source) -> list[Record]:
    return [_summary_record(count, drop) for count, drop in source.suppressed.values()]


def _summary_record(count: int, drop: Drop) -> Record:
    fields = drop_fields(drop)
    fields["HOSTWALL_COUNT"] = str(count)
    fields.pop("HOSTWALL_SRC_PORT", None)  # the ports vary within a summary
    return Record(
        message=(f"dropped {count} more packets from {drop.packet.src} "
                 f"(service={drop.service}, iface={drop.interface}); records for this source "
                 "are summarised while it floods"),
        message_id=MESSAGE_ID_DROP_SUMMARY,
        priority=PRIORITY_NOTICE,
        fields=fields,
    )


def _recon(drop: Drop, per_minute: int) -> Record:
    fields = drop_fields(drop)
    fields.pop("HOSTWALL_SRC_PORT", None)
    fields["HOSTWALL_DROPS_PER_MINUTE"] = str(per_minute)
    return Record(
        message=(f"possible reconnaissance: {drop.packet.src} had {per_minute} packets dropped "
                 f"within a minute (service={drop.service})"),
        message_id=MESSAGE_ID_RECON,
        priority=PRIORITY_WARNING,
        fields=fields,
    )


def lost_record(lost: int, total_lost: int) -> Record:
    return Record(
        message=(f"{lost} drop log events were lost before hostwall could read them "
                 f"({total_lost} since start); the kernel's counters still count every drop"),
        message_id=MESSAGE_ID_LOST,
        priority=PRIORITY_WARNING,
        fields={"HOSTWALL_LOST": str(lost), "HOSTWALL_LOST_TOTAL": str(total_lost)},
    )
