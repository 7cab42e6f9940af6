"""The path from the NFLOG socket to the journal, without the socket and without journald:
the netlink parsing of logged packets, the DropStreamer over a scripted packet source,
interface names, and the journald sink's fallback to stderr."""

from __future__ import annotations

import io
import socket
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink import nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ULOG, nfgen_msg
from test_packet import ICMP, TCP, UDP, icmp_echo, ipv4_packet, ipv6_packet, tcp, udp

from hostwall.agent import DropStreamer, InterfaceNames
from hostwall.drops import (
    MESSAGE_ID_DROP,
    MESSAGE_ID_DROP_SUMMARY,
    MESSAGE_ID_LOST,
    PRIORITY_NOTICE,
    PRIORITY_WARNING,
    DropReporter,
    FloodControl,
    Record,
)
from hostwall.journal import SYSLOG_IDENTIFIER, JournalSink
from hostwall.nflog import NFULNL_MSG_PACKET, LoggedPacket, NflogStream, ReadResult, _decode, _messages


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedSource:
    """A PacketSource that returns the given results in order, then nothing."""

    def __init__(self, results: Iterable[ReadResult]) -> None:
        self._results = list(results)
        self.timeouts: list[float] = []

    def read(self, timeout: float) -> ReadResult:
        self.timeouts.append(timeout)
        return self._results.pop(0) if self._results else ReadResult()


class ListSink:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def send(self, record: Record) -> None:
        self.records.append(record)


def logged(payload: bytes, prefix: str = "hostwall:https", ifindex: int | None = 2) -> LoggedPacket:
    return LoggedPacket(prefix, ifindex, payload, None, None)


SSH_V4 = ipv4_packet(TCP, tcp(51514, 22), src="198.51.100.7", dst="192.0.2.10")
HTTPS_V6 = ipv6_packet(TCP, tcp(40000, 443), src="2001:db8::7", dst="2001:db8::10")


class Harness:
    def __init__(self, results: Iterable[ReadResult], *, records_per_window: int = 5,
                 generation: int | None = 3) -> None:
        self.clock = FakeClock()
        self.source = ScriptedSource(results)
        self.sink = ListSink()
        self.generation = generation
        self.generation_calls = 0
        self.ifindexes: list[int | None] = []
        reporter = DropReporter(FloodControl(10.0, records_per_window, 10**9), self.clock)
        self.streamer = DropStreamer(self.source, self.sink, reporter, self._interface, self._generation,
                                     clock=self.clock, lost_report_seconds=10.0)

    def _interface(self, ifindex: int | None) -> str:
        self.ifindexes.append(ifindex)
        return "?" if ifindex is None else f"net{ifindex}"

    def _generation(self) -> int | None:
        self.generation_calls += 1
        return self.generation


# --- DropStreamer -----------------------------------------------------------------------


def test_a_logged_packet_becomes_a_drop_record() -> None:
    run = Harness([ReadResult([logged(SSH_V4, "hostwall:ssh", ifindex=4)])])
    run.streamer.step(0.2)
    (record,) = run.sink.records
    assert record.message == "dropped tcp 198.51.100.7:51514 -> 192.0.2.10:22 service=ssh iface=net4"
    assert record.message_id == MESSAGE_ID_DROP
    assert record.fields["HOSTWALL_GENERATION"] == "3"
    assert record.fields["HOSTWALL_IIF"] == "net4"
    assert run.ifindexes == [4]
    assert run.source.timeouts == pytest.approx([0.2, 0.2])  # having read something, again for the time left
    assert (run.streamer.stats.packets, run.streamer.stats.records) == (1, 1)
    assert run.streamer.stats.by_service == {"ssh": 1}


def test_ipv6_and_unknown_interface() -> None:
    run = Harness([ReadResult([logged(HTTPS_V6, ifindex=None)])])
    run.streamer.step(0.2)
    (record,) = run.sink.records
    assert record.message == "dropped tcp [2001:db8::7]:40000 -> [2001:db8::10]:443 service=https iface=?"


def test_foreign_prefixes_are_ignored() -> None:
    run = Harness([ReadResult([logged(SSH_V4, "ufw-block:"), logged(SSH_V4, ""),
                               logged(SSH_V4, "hostwall:ssh")])])
    run.streamer.step(0.2)
    assert [r.fields["HOSTWALL_SERVICE"] for r in run.sink.records] == ["ssh"]
    assert run.streamer.stats.packets == 1
    assert run.streamer.stats.by_service == {"ssh": 1}


def test_undecodable_payloads_are_counted_not_recorded() -> None:
    packets = [logged(b""), logged(b"\x50" + bytes(39)), logged(SSH_V4[:12]), logged(SSH_V4)]
    run = Harness([ReadResult(packets)])
    run.streamer.step(0.2)
    assert [r.message_id for r in run.sink.records] == [MESSAGE_ID_DROP]
    stats = run.streamer.stats
    assert (stats.undecodable, stats.packets, stats.records) == (3, 4, 1)
    assert stats.by_service == {"https": 4}


def test_lost_events_are_reported_with_a_running_total() -> None:
    run = Harness([ReadResult(lost=5), ReadResult([logged(SSH_V4)], lost=2), ReadResult()])
    run.streamer.step(0.2)
    (first,) = run.sink.records
    assert first.message_id == MESSAGE_ID_LOST
    assert first.priority == PRIORITY_WARNING
    assert first.fields == {"HOSTWALL_LOST": "5", "HOSTWALL_LOST_TOTAL": "5"}
    run.clock.now += 10
    run.streamer.step(0.2)
    second = run.sink.records[1]
    assert second.fields == {"HOSTWALL_LOST": "2", "HOSTWALL_LOST_TOTAL": "7"}
    assert run.sink.records[2].message_id == MESSAGE_ID_DROP
    run.streamer.step(0.2)
    assert len(run.sink.records) == 3
    assert run.streamer.stats.lost == 7


def test_losses_in_many_reads_make_one_record_per_interval_and_the_rest_at_finish() -> None:
    """While the socket overflows nearly every bounded read sees a gap: the journal gets
    the first loss at once, then the sums, and every lost event is counted once."""
    run = Harness([ReadResult(lost=3) for _ in range(50)])
    for _ in range(50):  # 0.5 s apart: 25 s
        run.streamer.step(0.2)
        run.clock.now += 0.5
    run.streamer.finish()
    reports = [r for r in run.sink.records if r.message_id == MESSAGE_ID_LOST]
    assert [r.fields["HOSTWALL_LOST"] for r in reports] == ["3", "60", "60", "27"]
    assert reports[-1].fields["HOSTWALL_LOST_TOTAL"] == "150" == str(run.streamer.stats.lost)


def test_generation_comes_from_the_callable_once_per_batch() -> None:
    run = Harness([ReadResult([logged(SSH_V4)]), ReadResult([logged(HTTPS_V6)]), ReadResult(), ReadResult(),
                   ReadResult([logged(SSH_V4)])])
    run.streamer.step(0.2)  # two batches, one generation
    assert [r.fields["HOSTWALL_GENERATION"] for r in run.sink.records] == ["3", "3"]
    assert run.generation_calls == 1
    run.streamer.step(0.2)
    assert run.generation_calls == 1  # nothing read, nothing asked
    run.generation = 4
    run.streamer.step(0.2)
    assert run.sink.records[-1].fields["HOSTWALL_GENERATION"] == "4"


class QueuedSource:
    """A flood: a batch is queued on every read; each read takes read_seconds of the clock.
    Records what the sink held when each read began."""

    def __init__(self, clock: FakeClock, sink: ListSink, read_seconds: float) -> None:
        self.clock, self.sink, self.read_seconds = clock, sink, read_seconds
        self.timeouts: list[float] = []
        self.records_at_read: list[int] = []

    def read(self, timeout: float) -> ReadResult:
        self.timeouts.append(timeout)
        self.records_at_read.append(len(self.sink.records))
        self.clock.now += self.read_seconds
        return ReadResult([logged(ipv4_packet(UDP, udp(1000 + len(self.timeouts), 53), src=f"10.0.0.{n}"))
                           for n in range(1, 3)])


def test_during_a_flood_a_step_reads_batch_after_batch_for_its_timeout() -> None:
    """Each batch is recorded before the next is read (memory stays bounded by the
    source's batch size), the later reads wait only for what is left of the timeout, and
    the step returns once it has passed, so the agent's other duties still run."""
    clock, sink = FakeClock(), ListSink()
    source = QueuedSource(clock, sink, 0.0625)
    generation_calls = []

    def generation() -> int:
        generation_calls.append(clock.now)
        return 3

    streamer = DropStreamer(source, sink, DropReporter(FloodControl(10.0, 5, 10**9), clock),
                            lambda _: "net2", generation, clock=clock)
    streamer.step(0.25)
    assert source.timeouts == [0.25, 0.1875, 0.125, 0.0625]
    assert source.records_at_read == [0, 2, 4, 6]
    assert streamer.stats.packets == 8 and len(generation_calls) == 1


def test_no_generation_no_field() -> None:
    run = Harness([ReadResult([logged(SSH_V4)])], generation=None)
    run.streamer.step(0.2)
    assert "HOSTWALL_GENERATION" not in run.sink.records[0].fields


def test_ended_windows_are_summarised_by_a_later_step_and_the_rest_by_finish() -> None:
    flood = [logged(ipv4_packet(UDP, udp(port, 53))) for port in range(1000, 1008)]
    run = Harness([ReadResult(flood), ReadResult(), ReadResult(), ReadResult(flood[:4])], records_per_window=5)
    run.streamer.step(0.2)
    assert [r.message_id for r in run.sink.records] == [MESSAGE_ID_DROP] * 5
    run.clock.now += 10.0
    run.streamer.step(0.2)  # nothing read; the window ended
    summary = run.sink.records[-1]
    assert summary.message_id == MESSAGE_ID_DROP_SUMMARY
    assert summary.fields["HOSTWALL_COUNT"] == "3"
    run.streamer.step(0.2)  # a new window: 4 individual records
    assert len(run.sink.records) == 5 + 1 + 4
    run.streamer.finish()
    assert len(run.sink.records) == 10  # nothing suppressed in the new window

    again = Harness([ReadResult(flood)], records_per_window=2)
    again.streamer.step(0.2)
    assert len(again.sink.records) == 2
    again.streamer.finish()
    assert again.sink.records[-1].message_id == MESSAGE_ID_DROP_SUMMARY
    assert again.sink.records[-1].fields["HOSTWALL_COUNT"] == "6"
    assert again.streamer.stats.records == 3
    assert sum(int(r.fields["HOSTWALL_COUNT"]) for r in again.sink.records) == len(flood)


def test_icmp_and_fragments_pass_through() -> None:
    packets = [logged(ipv4_packet(ICMP, icmp_echo())),
               logged(ipv4_packet(UDP, udp(1, 2), more_fragments=True, fragment_offset=10))]
    run = Harness([ReadResult(packets)])
    run.streamer.step(0.2)
    icmp, fragment = run.sink.records
    assert icmp.message == "dropped icmp 198.51.100.7 -> 192.0.2.10 service=https iface=net2"
    assert fragment.fields["HOSTWALL_FRAGMENT"] == "1"
    assert "HOSTWALL_DPORT" not in fragment.fields


# --- interface names --------------------------------------------------------------------


def test_interface_names_from_the_kernel() -> None:
    names = InterfaceNames(None, clock=FakeClock())
    index, name = socket.if_nameindex()[0]
    assert names(index) == name
    assert names(None) == "?"
    unused = max(i for i, _ in socket.if_nameindex()) + 100_000
    assert names(unused) == f"if{unused}"


# --- nflog message parsing --------------------------------------------------------------

PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET


class nflog_packet_msg(nfgen_msg):  # type: ignore[misc]
    """A logged packet as pyroute2 encodes and decodes it: the reference that the
    reader's own parser (_decode) is checked against."""

    nla_map = (
        ("NFULA_UNSPEC", "none"),
        ("NFULA_PACKET_HDR", "packet_hdr"),
        ("NFULA_MARK", "be32"),
        ("NFULA_TIMESTAMP", "timestamp"),
        ("NFULA_IFINDEX_INDEV", "be32"),
        ("NFULA_IFINDEX_OUTDEV", "be32"),
        ("NFULA_IFINDEX_PHYSINDEV", "be32"),
        ("NFULA_IFINDEX_PHYSOUTDEV", "be32"),
        ("NFULA_HWADDR", "hex"),
        ("NFULA_PAYLOAD", "cdata"),
        ("NFULA_PREFIX", "asciiz"),
        ("NFULA_UID", "be32"),
        ("NFULA_SEQ", "be32"),
        ("NFULA_SEQ_GLOBAL", "be32"),
    )

    class packet_hdr(nla):  # type: ignore[misc]
        fields = (("hw_protocol", ">H"), ("hook", "B"), ("_pad", "B"))

    class timestamp(nla):  # type: ignore[misc]
        fields = (("sec", ">Q"), ("usec", ">Q"))


def nflog_message(attrs: list[list[Any]], sequence: int = 0) -> bytes:
    message = nflog_packet_msg()
    message["nfgen_family"] = socket.AF_INET
    message["res_id"] = 100
    message["header"]["type"] = PACKET_TYPE
    message["header"]["sequence_number"] = sequence
    message["attrs"] = attrs
    message.encode()
    return bytes(message.data)


def unpadded(message: bytes, payload_length: int) -> bytes:
    """The message with the padding after its last attribute cut off, as netlink allows:
    the header's length then is not a multiple of 4."""
    length = len(message) - (-payload_length % 4)
    return struct.pack("=I", length) + message[4:length]


def test_decode_a_logged_packet() -> None:
    data = nflog_message([
        ["NFULA_PREFIX", "hostwall:ssh"],
        ["NFULA_IFINDEX_INDEV", 3],
        ["NFULA_PAYLOAD", SSH_V4],
        ["NFULA_SEQ", 41],
        ["NFULA_TIMESTAMP", {"sec": 1_800_000_000, "usec": 250_000}],
    ])
    assert _decode(data) == LoggedPacket("hostwall:ssh", 3, SSH_V4, 41, 1_800_000_000.25)


def test_decode_without_optional_attributes() -> None:
    assert _decode(nflog_message([["NFULA_PAYLOAD", SSH_V4]])) == LoggedPacket("", None, SSH_V4, None, None)


def _decoded_by_pyroute2(data: bytes) -> LoggedPacket:
    message = nflog_packet_msg(data)
    message.decode()
    stamp = message.get_attr("NFULA_TIMESTAMP")
    return LoggedPacket(
        prefix=message.get_attr("NFULA_PREFIX") or "",
        ifindex=message.get_attr("NFULA_IFINDEX_INDEV"),
        payload=bytes(message.get_attr("NFULA_PAYLOAD") or b""),
        sequence=message.get_attr("NFULA_SEQ"),
        timestamp=stamp["sec"] + stamp["usec"] / 1e6 if stamp is not None else None,
    )


_U32 = st.integers(0, 2**32 - 1)
_ATTRIBUTES = st.lists(st.one_of(
    st.tuples(st.just("NFULA_PACKET_HDR"), st.fixed_dictionaries(
        {"hw_protocol": st.sampled_from([0x0800, 0x86DD]), "hook": st.integers(0, 4), "_pad": st.just(0)})),
    st.tuples(st.just("NFULA_MARK"), _U32),
    st.tuples(st.just("NFULA_TIMESTAMP"), st.fixed_dictionaries(
        {"sec": st.integers(0, 2**40), "usec": st.integers(0, 999_999)})),
    st.tuples(st.sampled_from(["NFULA_IFINDEX_INDEV", "NFULA_IFINDEX_OUTDEV", "NFULA_UID", "NFULA_SEQ",
                               "NFULA_SEQ_GLOBAL"]), _U32),
    st.tuples(st.just("NFULA_PAYLOAD"), st.binary(min_size=1, max_size=160)),
    st.tuples(st.just("NFULA_PREFIX"), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60)),
), max_size=8, unique_by=lambda attr: attr[0])


@given(_ATTRIBUTES)
def test_decode_agrees_with_pyroute2(attrs: list[tuple[str, Any]]) -> None:
    """The hand-written parser reads what pyroute2's message classes read, whatever the
    kernel sends along (attributes in any order, padded or not, ones hostwall ignores)."""
    data = nflog_message([list(attr) for attr in attrs], 7)
    assert _decode(data) == _decoded_by_pyroute2(data)
    framed = b"\xff" * 12 + data + b"\xee" * 8  # a message inside the receive buffer
    assert _decode(memoryview(framed), 12, 12 + len(data)) == _decoded_by_pyroute2(data)


def test_decode_skips_an_attribute_cut_short() -> None:
    data = nflog_message([["NFULA_PREFIX", "hostwall:ssh"], ["NFULA_PAYLOAD", SSH_V4]])
    cut = data[:-8]  # the payload attribute claims more bytes than the message holds
    assert _decode(cut) == LoggedPacket("hostwall:ssh", None, b"", None, None)


def test_messages_walks_concatenated_messages_with_padding() -> None:
    payload = ipv4_packet(UDP, udp(1000, 53, b"x"))  # 29 bytes: the message needs padding
    assert len(payload) % 4
    first = unpadded(nflog_message([["NFULA_PREFIX", "hostwall:dns"], ["NFULA_PAYLOAD", payload]], 1),
                     len(payload))
    second = nflog_message([["NFULA_PREFIX", "hostwall:ssh"], ["NFULA_IFINDEX_INDEV", 7],
                            ["NFULA_PAYLOAD", SSH_V4]], 2)
    assert len(first) % 4
    buffer = first + bytes(-len(first) % 4) + second
    found = list(_messages(memoryview(buffer)))
    assert [(kind, sequence, offset, length) for kind, sequence, offset, length in found] == [
        (PACKET_TYPE, 1, 0, len(first)),
        (PACKET_TYPE, 2, len(first) + (-len(first) % 4), len(second)),
    ]
    decoded = [_decode(buffer[offset:offset + length]) for _, _, offset, length in found]
    assert [(p.prefix, p.ifindex, p.payload) for p in decoded] == [
        ("hostwall:dns", None, payload), ("hostwall:ssh", 7, SSH_V4)]


@pytest.mark.parametrize("cut", [1, 15, 16, 20])
def test_messages_stops_at_a_message_cut_short(cut: int) -> None:
    whole = nflog_message([["NFULA_PAYLOAD", SSH_V4]], 1)
    buffer = whole + nflog_message([["NFULA_PAYLOAD", SSH_V4]], 2)[:cut]
    assert [sequence for _, sequence, _, _ in _messages(memoryview(buffer))] == [1]


def test_messages_stops_at_a_length_below_the_header() -> None:
    whole = nflog_message([["NFULA_PAYLOAD", SSH_V4]], 1)
    broken = struct.pack("=IHHII", 8, PACKET_TYPE, 0, 2, 0) + whole  # a length inside its own header
    assert list(_messages(memoryview(whole + broken))) == [(PACKET_TYPE, 1, 0, len(whole))]
    zero = struct.pack("=IHHII", 0, PACKET_TYPE, 0, 2, 0)
    assert list(_messages(memoryview(zero + whole))) == []


# --- reading a socket in bounded batches ------------------------------------------------


def _datagram(sequences: Iterable[int]) -> bytes:
    """What one receive from an NFLOG socket returns: several logged packets in a row."""
    return b"".join(nflog_message([["NFULA_PREFIX", "hostwall:https"], ["NFULA_PAYLOAD", SSH_V4],
                                   ["NFULA_SEQ", sequence]], sequence) for sequence in sequences)


@pytest.fixture
def datagrams() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_a_read_returns_at_most_the_bound_and_the_next_reads_the_rest(
        datagrams: tuple[socket.socket, socket.socket]) -> None:
    """A socket that holds more than one read may return (as under a flood, when it never
    runs dry) is read in batches of at most max_packets, in order, nothing lost; the rest
    of a datagram cut by the bound comes first in the next read, which does not wait."""
    sender, receiver = datagrams
    for first in range(0, 320, 40):
        sender.send(_datagram(range(first, first + 40)))
    stream = NflogStream(receiver, 50, bytearray(1 << 16))
    batches = []
    for _ in range(20):  # bounded: 320 packets need 7 reads
        result = stream.read(0.0)
        assert result.lost == 0
        if not result.packets:
            break
        batches.append([packet.sequence for packet in result.packets])
    assert [len(batch) for batch in batches] == [50] * 6 + [20]
    assert [sequence for batch in batches for sequence in batch] == list(range(320))


def test_a_sequence_gap_is_counted_as_lost_once(datagrams: tuple[socket.socket, socket.socket]) -> None:
    sender, receiver = datagrams
    sender.send(_datagram(range(10)))
    sender.send(_datagram(range(15, 20)))  # the kernel could not deliver 10-14
    stream = NflogStream(receiver, 8, bytearray(1 << 16))
    results = [stream.read(0.0) for _ in range(3)]
    assert [len(r.packets) for r in results] == [8, 7, 0]
    assert sum(r.lost for r in results) == 5


def test_a_read_with_nothing_to_read_waits_at_most_its_timeout(
        datagrams: tuple[socket.socket, socket.socket]) -> None:
    _, receiver = datagrams
    stream = NflogStream(receiver, 8, bytearray(1 << 16))
    assert stream.read(0.01) == ReadResult()


# --- journald sink ----------------------------------------------------------------------


class FakeJournal:
    """Stands in for systemd.journal.send: records the fields, or fails like a missing socket."""

    def __init__(self) -> None:
        self.sent: list[dict[str, str]] = []
        self.calls = 0
        self.down = False

    def __call__(self, **fields: str) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.sent.append(fields)


def journal_sink(extra: dict[str, str] | None = None) -> tuple[JournalSink, FakeJournal, io.StringIO, FakeClock]:
    clock = FakeClock()
    fallback = io.StringIO()
    sink = JournalSink(extra, fallback=fallback, clock=clock, retry_seconds=2.0,
                       socket_path=Path(__file__))  # any path that exists stands for the socket
    journal = FakeJournal()
    sink._send = journal
    return sink, journal, fallback, clock


RECORD = Record("dropped tcp 198.51.100.7:51514 -> 192.0.2.10:22 service=ssh iface=eth0", MESSAGE_ID_DROP,
                PRIORITY_NOTICE, {"HOSTWALL_SERVICE": "ssh", "HOSTWALL_COUNT": "1"})


def test_journal_gets_the_record_fields() -> None:
    sink, journal, fallback, _ = journal_sink({"HOSTWALL_NETNS": "lab"})
    sink.send(RECORD)
    assert journal.sent == [{
        "MESSAGE": RECORD.message,
        "MESSAGE_ID": MESSAGE_ID_DROP,
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "HOSTWALL_NETNS": "lab",
        "HOSTWALL_SERVICE": "ssh",
        "HOSTWALL_COUNT": "1",
    }]
    assert SYSLOG_IDENTIFIER == "hostwall"
    assert fallback.getvalue() == ""
    assert sink.available and sink.fallback_records == 0


def test_journal_outage_falls_back_to_the_stream_and_retries_later() -> None:
    sink, journal, fallback, clock = journal_sink()
    journal.down = True
    sink.send(RECORD)
    assert fallback.getvalue() == f"hostwall: {RECORD.message}\n"
    assert not sink.available
    assert journal.calls == 1

    clock.now += 1.9  # within retry_seconds: journald is not tried
    journal.down = False
    sink.send(RECORD)
    assert journal.calls == 1 and journal.sent == []
    assert fallback.getvalue().count("\n") == 2

    clock.now += 0.1  # 2 s after the failure: tried again, and it works
    sink.send(RECORD)
    assert journal.calls == 2 and len(journal.sent) == 1
    assert sink.available
    sink.send(RECORD)
    assert len(journal.sent) == 2
    assert sink.fallback_records == 2
    assert fallback.getvalue() == f"hostwall: {RECORD.message}\n" * 2


def test_journal_still_down_at_the_retry_waits_again() -> None:
    sink, journal, fallback, clock = journal_sink()
    journal.down = True
    sink.send(RECORD)
    clock.now += 2.0
    sink.send(RECORD)  # retried, failed again: the wait starts over
    assert journal.calls == 2
    clock.now += 1.0
    journal.down = False
    sink.send(RECORD)
    assert journal.calls == 2
    clock.now += 1.0
    sink.send(RECORD)
    assert journal.calls == 3 and len(journal.sent) == 1
    assert sink.fallback_records == 3
    assert fallback.getvalue().splitlines() == [f"hostwall: {RECORD.message}"] * 3


def test_a_missing_journal_socket_is_an_outage_too(tmp_path: Path) -> None:
    """libsystemd drops a record without an error when the socket file is missing."""
    sink, journal, fallback, clock = journal_sink()
    sink._socket_path = tmp_path / "socket"
    sink.send(RECORD)
    assert journal.sent == [] and fallback.getvalue() == f"hostwall: {RECORD.message}\n"
    assert not sink.available

    (tmp_path / "socket").touch()  # journald is back
    clock.now += 2.0
    sink.send(RECORD)
    assert len(journal.sent) == 1 and sink.available
