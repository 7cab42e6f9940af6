"""The NFLOG reader against the kernel: what a flood leaves queued in the socket is read
in bounded batches, in order, nothing lost between them."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns_support import Cli, send_udp
from test_drop_logs import _policy

from hostwall.lab import Lab
from hostwall.nflog import NflogReader, NflogSettings
from hostwall.packet import decode

pytestmark = pytest.mark.root


def test_a_queued_flood_is_read_in_bounded_batches_without_loss(
    lab: Lab, policy_dir: Path, hostwall: Cli
) -> None:
    _policy(policy_dir, lab, log_rate=100_000, log_burst=100_000)  # the kernel logs every datagram
    assert hostwall("apply").returncode == 0
    reader = NflogReader(NflogSettings(group=100, max_packets_per_read=100), lab.server)
    try:
        sent = 2000
        send_udp(lab.denied.namespace, lab.denied.server_ipv4, 443, sent)  # all queued before any read
        batches, lost = [], 0
        for _ in range(100):  # bounded: 2000 packets need 20 reads, an empty one ends it
            result = reader.read(1.0)
            lost += result.lost
            if not result.packets:
                break
            batches.append(result.packets)
    finally:
        reader.close()
    assert max(len(batch) for batch in batches) == 100
    assert len(batches[0]) == 100, "the first read stops at the bound though more is queued"
    packets = [packet for batch in batches for packet in batch]
    assert lost == 0 and len(packets) == sent
    first = packets[0].sequence
    assert first is not None
    assert [packet.sequence for packet in packets] == list(range(first, first + sent))
    assert {decode(packet.payload).src for packet in packets} == {lab.denied.ipv4}
