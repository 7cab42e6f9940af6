"""From drops to journal records: wording and fields, flood control per source and window
(counts always add up), the reconnaissance warning, the memory bound; and the --since
parser of `hostwall drops`."""

from __future__ import annotations

import random
import time
from collections import Counter
from datetime import UTC, datetime

import click
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.cli.journal import parse_since
from hostwall.drops import (
    MESSAGE_ID_DROP,
    MESSAGE_ID_DROP_SUMMARY,
    MESSAGE_ID_LOST,
    MESSAGE_ID_RECON,
    PRIORITY_NOTICE,
    PRIORITY_WARNING,
    Drop,
    DropReporter,
    FloodControl,
    Record,
    lost_record,
    origin_of,
    service_of,
)
from hostwall.packet import PacketSummary


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def drop(src: str = "198.51.100.7", src_port: int | None = 51514, *, dst: str = "192.0.2.10",
         dst_port: int | None = 443, protocol: str = "tcp", service: str = "https", interface: str = "eth0",
         generation: int | None = 7, fragment: bool = False) -> Drop:
    family = 6 if ":" in src else 4
    return Drop(service, PacketSummary(family, src, dst, protocol, src_port, dst_port, fragment), interface,
                generation)


def with_id(records: list[Record], message_id: str) -> list[Record]:
    return [r for r in records if r.message_id == message_id]


def counts_by_source(records: list[Record]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for (source, _), count in counts_by_source_and_service(records).items():
        totals[source] += count
    return totals


def counts_by_source_and_service(records: list[Record]) -> Counter[tuple[str, str]]:
    """What `hostwall drops --top` adds up."""
    totals: Counter[tuple[str, str]] = Counter()
    for record in records:
        if "HOSTWALL_COUNT" in record.fields:
            key = (record.fields["HOSTWALL_SRC"], record.fields["HOSTWALL_SERVICE"])
            totals[key] += int(record.fields["HOSTWALL_COUNT"])
    return totals


N = 5  # records_per_source_per_window in these tests
QUIET = 10**9  # a recon threshold no test reaches unless it means to


def reporter(clock: FakeClock, *, window: float = 10.0, records: int = N, recon: int = QUIET,
             max_sources: int = 10_000) -> DropReporter:
    return DropReporter(FloodControl(window, records, recon, max_sources), clock)


# --- one record per drop ----------------------------------------------------------------


def test_a_drop_becomes_one_record_with_message_and_fields() -> None:
    records = reporter(FakeClock()).observe(drop())
    assert records == [Record(
        message="dropped tcp 198.51.100.7:51514 -> 192.0.2.10:443 service=https iface=eth0",
        message_id=MESSAGE_ID_DROP,
        priority=PRIORITY_NOTICE,
        fields={
            "HOSTWALL_SERVICE": "https",
            "HOSTWALL_SRC": "198.51.100.7",
            "HOSTWALL_SRC_PORT": "51514",
            "HOSTWALL_DST": "192.0.2.10",
            "HOSTWALL_DPORT": "443",
            "HOSTWALL_PROTO": "tcp",
            "HOSTWALL_IIF": "eth0",
            "HOSTWALL_REASON": "not-allowed",
            "HOSTWALL_GENERATION": "7",
            "HOSTWALL_COUNT": "1",
        },
    )]


def test_ipv6_endpoints_are_bracketed() -> None:
    (record,) = reporter(FakeClock()).observe(
        drop("2001:db8::7", 5353, dst="2001:db8::10", dst_port=53, protocol="udp", service="dns", interface="eth1"))
    assert record.message == "dropped udp [2001:db8::7]:5353 -> [2001:db8::10]:53 service=dns iface=eth1"
    assert record.fields["HOSTWALL_SRC"] == "2001:db8::7"
    assert record.fields["HOSTWALL_DST"] == "2001:db8::10"


def test_drop_without_ports_or_generation_omits_those_fields() -> None:
    (record,) = reporter(FakeClock()).observe(
        drop(src_port=None, dst_port=None, protocol="icmp", service="ssh", generation=None))
    assert record.message == "dropped icmp 198.51.100.7 -> 192.0.2.10 service=ssh iface=eth0"
    assert record.fields == {
        "HOSTWALL_SERVICE": "ssh", "HOSTWALL_SRC": "198.51.100.7", "HOSTWALL_DST": "192.0.2.10",
        "HOSTWALL_PROTO": "icmp", "HOSTWALL_IIF": "eth0", "HOSTWALL_REASON": "not-allowed", "HOSTWALL_COUNT": "1",
    }


def test_fragment_is_marked() -> None:
    (record,) = reporter(FakeClock()).observe(drop(fragment=True))
    assert record.fields["HOSTWALL_FRAGMENT"] == "1"
    (plain,) = reporter(FakeClock()).observe(drop())
    assert "HOSTWALL_FRAGMENT" not in plain.fields


# --- flood control ----------------------------------------------------------------------


def test_first_records_individual_then_one_summary_after_the_window() -> None:
    clock = FakeClock()
    flood = reporter(clock)
    records = []
    for port in range(40000, 40008):
        clock.now += 0.5
        records += flood.observe(drop(src_port=port))
    assert [r.message_id for r in records] == [MESSAGE_ID_DROP] * N
    assert [r.fields["HOSTWALL_SRC_PORT"] for r in records] == [str(p) for p in range(40000, 40005)]

    clock.now = 1000.0 + 0.5 + 9.9  # the window opened with the first drop and has not ended
    assert flood.flush() == []
    clock.now = 1000.0 + 0.5 + 10.0
    (summary,) = flood.flush()
    assert summary.message_id == MESSAGE_ID_DROP_SUMMARY
    assert summary.priority == PRIORITY_NOTICE
    assert summary.fields["HOSTWALL_COUNT"] == "3"
    assert "HOSTWALL_SRC_PORT" not in summary.fields  # the ports vary within a summary
    assert summary.fields["HOSTWALL_SRC"] == "198.51.100.7"
    assert summary.fields["HOSTWALL_SERVICE"] == "https"
    assert summary.message.startswith("dropped 3 more packets from 198.51.100.7 (service=https, iface=eth0)")
    assert flood.flush() == []  # summarised once
    assert flood.flush_all() == []


def test_a_new_window_gets_individual_records_again() -> None:
    clock = FakeClock()
    flood = reporter(clock)
    for _ in range(N + 2):
        flood.observe(drop())
    clock.now += 10.0
    records = flood.observe(drop())
    assert [r.message_id for r in records] == [MESSAGE_ID_DROP_SUMMARY, MESSAGE_ID_DROP]
    assert records[0].fields["HOSTWALL_COUNT"] == "2"


def test_sources_are_limited_separately() -> None:
    clock = FakeClock()
    flood = reporter(clock)
    records = []
    for _ in range(N):
        records += flood.observe(drop("198.51.100.7"))
        records += flood.observe(drop("203.0.113.9"))
    assert len(with_id(records, MESSAGE_ID_DROP)) == 2 * N


def test_summaries_are_per_service() -> None:
    clock = FakeClock()
    flood = reporter(clock)
    for _ in range(N + 4):
        flood.observe(drop(service="ssh", dst_port=22))
    flood.observe(drop(service="https", dst_port=443))
    summaries = flood.flush_all()
    assert [(r.fields["HOSTWALL_SERVICE"], r.fields["HOSTWALL_DPORT"], r.fields["HOSTWALL_COUNT"])
            for r in summaries] == [("ssh", "22", "4"), ("https", "443", "1")]
    assert summaries[0].message.startswith("dropped 4 more packets from 198.51.100.7 (service=ssh, iface=eth0)")


def test_flush_all_summarises_windows_that_have_not_ended() -> None:
    clock = FakeClock()
    flood = reporter(clock)
    for _ in range(N + 4):
        flood.observe(drop("198.51.100.7"))
    for _ in range(N + 1):
        flood.observe(drop("2001:db8::7"))
    for _ in range(N):
        flood.observe(drop("203.0.113.9"))
    assert flood.flush() == []
    summaries = flood.flush_all()
    assert {r.fields["HOSTWALL_SRC"]: r.fields["HOSTWALL_COUNT"] for r in summaries} == {
        "198.51.100.7": "4", "2001:db8::7": "1"}
    assert all(r.message_id == MESSAGE_ID_DROP_SUMMARY for r in summaries)
    assert flood.flush_all() == []


SERVICES = ("ssh", "https", "postgres")


def _replay(seed: int, sources: int, drops: int, max_sources: int, window: float) -> tuple[
        list[Record], Counter[tuple[str, str]], float]:
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    flood = reporter(clock, window=window, records=3, recon=40, max_sources=max_sources)
    addresses = [f"198.51.100.{i}" if i % 2 else f"2001:db8::{i:x}" for i in range(1, sources + 1)]
    # Skewed: a couple of sources flood, the rest trickle.
    weights = [50 if i < 2 else 1 for i in range(sources)]
    seen: Counter[tuple[str, str]] = Counter()
    records: list[Record] = []
    for _ in range(drops):
        clock.now += rng.expovariate(20.0)
        address = rng.choices(addresses, weights)[0]
        service = rng.choice(SERVICES)
        seen[address, service] += 1
        records += flood.observe(drop(address, rng.randrange(1024, 65536), service=service))
        if rng.random() < 0.05:
            records += flood.flush()
    records += flood.flush_all()
    return records, seen, clock.now


@pytest.mark.parametrize("seed", range(8))
def test_counts_add_up_and_records_stay_bounded(seed: int) -> None:
    sources, window, per_window = 6, 5.0, 3
    records, seen, elapsed = _replay(seed, sources, 3000, max_sources=sources, window=window)
    assert counts_by_source_and_service(records) == seen
    windows = int(elapsed // window) + 1  # window starts are at least one window apart
    recon = len(with_id(records, MESSAGE_ID_RECON))
    assert recon <= sources * (int(elapsed // 60) + 1)
    # Per source and window: the individual records, then one summary per service it hit.
    assert len(records) <= sources * windows * (per_window + len(SERVICES)) + recon
    assert len(records) < 3000 / 2  # the flood really was summarised
    assert {r.message_id for r in records} <= {MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY, MESSAGE_ID_RECON}


@pytest.mark.parametrize("seed", range(4))
def test_counts_add_up_when_sources_are_evicted(seed: int) -> None:
    records, seen, _ = _replay(seed, 12, 3000, max_sources=3, window=5.0)
    assert counts_by_source_and_service(records) == seen


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from(SERVICES), st.floats(0, 30), st.booleans()),
                max_size=200),
       st.integers(1, 4), st.integers(1, 5))
def test_counts_add_up_for_any_sequence(steps: list[tuple[int, str, float, bool]], per_window: int,
                                        max_sources: int) -> None:
    clock = FakeClock(0.0)
    flood = reporter(clock, window=7.0, records=per_window, recon=10, max_sources=max_sources)
    seen: Counter[tuple[str, str]] = Counter()
    records: list[Record] = []
    for source, service, delay, flush in steps:
        clock.now += delay
        address = f"192.0.2.{source}"
        seen[address, service] += 1
        records += flood.observe(drop(address, service=service))
        if flush:
            records += flood.flush()
    records += flood.flush_all()
    assert counts_by_source_and_service(records) == seen


# --- memory bound -----------------------------------------------------------------------


def test_evicted_source_is_summarised_not_lost() -> None:
    clock = FakeClock()
    flood = reporter(clock, max_sources=2)
    for _ in range(N + 3):
        flood.observe(drop("198.51.100.1"))
    flood.observe(drop("198.51.100.2"))
    records = flood.observe(drop("198.51.100.3"))  # the window has not ended: eviction summarises
    assert [(r.message_id, r.fields["HOSTWALL_SRC"], r.fields["HOSTWALL_COUNT"]) for r in records] == [
        (MESSAGE_ID_DROP_SUMMARY, "198.51.100.1", "3"),
        (MESSAGE_ID_DROP, "198.51.100.3", "1"),
    ]
    assert flood.flush_all() == []  # and not a second time


def test_eviction_forgets_the_least_recently_seen_source() -> None:
    clock = FakeClock()
    flood = reporter(clock, max_sources=2)
    for _ in range(N + 1):
        flood.observe(drop("198.51.100.1"))
    for _ in range(N + 1):
        flood.observe(drop("198.51.100.2"))
    flood.observe(drop("198.51.100.1"))  # 1 is now the more recent one
    records = flood.observe(drop("198.51.100.3"))
    assert [r.fields["HOSTWALL_SRC"] for r in with_id(records, MESSAGE_ID_DROP_SUMMARY)] == ["198.51.100.2"]
    # A forgotten source starts afresh: its next drops are recorded individually again.
    records = flood.observe(drop("198.51.100.2"))
    assert [r.message_id for r in records] == [MESSAGE_ID_DROP_SUMMARY, MESSAGE_ID_DROP]
    assert records[0].fields["HOSTWALL_SRC"] == "198.51.100.1"


def test_many_sources_keep_only_max_sources_in_memory() -> None:
    clock = FakeClock()
    flood = reporter(clock, records=1, max_sources=50)
    evicted: list[Record] = []
    for i in range(2000):
        address = f"10.0.{i // 256}.{i % 256}"
        records = flood.observe(drop(address)) + flood.observe(drop(address))  # one suppressed each
        evicted += with_id(records, MESSAGE_ID_DROP_SUMMARY)
    remaining = flood.flush_all()
    # Only the sources still held can be summarised at the end; the rest were summarised
    # when they were forgotten.
    assert len(remaining) == 50
    assert len(evicted) == 2000 - 50
    assert counts_by_source(evicted + remaining) == Counter({f"10.0.{i // 256}.{i % 256}": 1 for i in range(2000)})


# --- reconnaissance warning -------------------------------------------------------------


def test_recon_warning_once_per_minute_over_the_threshold() -> None:
    clock = FakeClock()
    flood = reporter(clock, recon=20)
    records = []
    warned_at = []
    for count in range(1, 101):
        clock.now += 0.5  # 100 drops within 50 s
        observed = flood.observe(drop(service="ssh"))
        warned_at += [count] * len(with_id(observed, MESSAGE_ID_RECON))
        records += observed
    assert warned_at == [21]
    (warning,) = with_id(records, MESSAGE_ID_RECON)
    assert warning.priority == PRIORITY_WARNING == 4
    assert warning.fields["HOSTWALL_DROPS_PER_MINUTE"] == "21"
    assert warning.fields["HOSTWALL_SRC"] == "198.51.100.7"
    assert warning.fields["HOSTWALL_SERVICE"] == "ssh"
    assert "HOSTWALL_SRC_PORT" not in warning.fields
    assert "HOSTWALL_COUNT" not in warning.fields  # not a drop: must not be added to the totals
    assert warning.message == ("possible reconnaissance: 198.51.100.7 had 21 packets dropped within a minute "
                               "(service=ssh)")
    # The next minute warns again.
    clock.now += 60
    records = []
    for _ in range(25):
        records += flood.observe(drop(service="ssh"))
    assert len(with_id(records, MESSAGE_ID_RECON)) == 1


def test_no_recon_warning_at_the_threshold() -> None:
    clock = FakeClock()
    flood = reporter(clock, recon=20)
    records = []
    for _ in range(20):
        clock.now += 2.9  # 20 drops within 58 s
        records += flood.observe(drop())
    clock.now += 4.9  # the 21st arrives a minute after the first: a new minute
    records += flood.observe(drop())
    assert with_id(records, MESSAGE_ID_RECON) == []


def test_recon_threshold_is_per_source() -> None:
    clock = FakeClock()
    flood = reporter(clock, recon=20)
    records = []
    for i in range(40):
        records += flood.observe(drop(f"198.51.100.{i % 2}"))  # 20 each
    assert with_id(records, MESSAGE_ID_RECON) == []
    records = flood.observe(drop("198.51.100.0")) + flood.observe(drop("198.51.100.0"))
    assert [r.fields["HOSTWALL_SRC"] for r in with_id(records, MESSAGE_ID_RECON)] == ["198.51.100.0"]


def test_recon_over_several_minutes_warns_once_each() -> None:
    clock = FakeClock()
    flood = reporter(clock, recon=30)
    records = []
    for _ in range(600):  # 10 minutes at one drop per second
        clock.now += 1.0
        records += flood.observe(drop())
    # 60 a minute, each minute over 30: one warning per minute.
    assert len(with_id(records, MESSAGE_ID_RECON)) == 10


# --- small functions --------------------------------------------------------------------


def test_lost_record() -> None:
    record = lost_record(5, 12)
    assert record.message_id == MESSAGE_ID_LOST
    assert record.priority == PRIORITY_WARNING
    assert record.fields == {"HOSTWALL_LOST": "5", "HOSTWALL_LOST_TOTAL": "12"}
    assert record.message.startswith("5 drop log events were lost")
    assert "(12 since start)" in record.message


@pytest.mark.parametrize(
    ("prefix", "service"),
    [
        ("hostwall:https", "https"),
        ("hostwall:postgres-replica", "postgres-replica"),
        ("hostwall", None),
        ("hostwall-https", None),
        ("Hostwall:https", None),
        ("other:https", None),
        ("ufw:hostwall:https", None),
        ("", None),
    ],
)
def test_service_of(prefix: str, service: str | None) -> None:
    assert service_of(prefix) == service


@pytest.mark.parametrize(
    ("prefix", "origin"),
    [("hostwall:https", ("https", "not-allowed")), ("hostwall:https:spoofed", ("https", "spoofed-source")),
     ("hostwall:db_2:spoofed", ("db_2", "spoofed-source")), ("ufw:hostwall:https:spoofed", None)],
)
def test_origin_of_tells_spoofed_drops_apart(prefix: str, origin: tuple[str, str] | None) -> None:
    assert origin_of(prefix) == origin


def test_a_spoofed_drop_says_so_in_its_record() -> None:
    (record,) = reporter(FakeClock()).observe(msgspec.structs.replace(drop(), reason="spoofed-source"))
    assert record.fields["HOSTWALL_REASON"] == "spoofed-source"
    assert record.message.endswith("(spoofed source: fails the reverse-path check)")


# --- hostwall drops --since -------------------------------------------------------------

NOW = 1_800_000_000.0
MOMENT = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", NOW - 30),
        ("10m", NOW - 600),
        ("2h", NOW - 7200),
        ("1d", NOW - 86400),
        ("0m", NOW),
        ("2026-11-28T12:00:00Z", MOMENT),
        ("2026-11-28T14:00:00+02:00", MOMENT),
        ("2026-11-28T07:00:00-05:00", MOMENT),
        ("2026-11-28T12:00:00", MOMENT),  # naive is UTC, not local time
        ("2026-11-28 12:00:00.250Z", MOMENT + 0.25),
    ],
)
def test_parse_since(text: str, expected: float, monkeypatch: pytest.MonkeyPatch) -> None:
    # Far from UTC, so that reading a naive time as local time would show.
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    try:
        assert parse_since(text, now=NOW) == expected
    finally:
        monkeypatch.undo()
        time.tzset()


def test_parse_since_relative_uses_the_clock_by_default() -> None:
    before = datetime.now(UTC).timestamp()
    assert before - 600 - 1 <= parse_since("10m") <= datetime.now(UTC).timestamp() - 600 + 1


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "10M", "-10m", "1.5h", "10 m", "yesterday",
                                  "2026-13-01T00:00:00Z", "2026-11-28T12:00:00+25:00"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_since(text, now=NOW)


@pytest.mark.parametrize("text", ["\u00b2m", "9" * 400 + "d"], ids=["superscript", "huge"])
def test_parse_since_rejects_odd_numbers(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_since(text, now=NOW)
