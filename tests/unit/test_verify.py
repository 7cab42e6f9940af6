"""verify's pure parts: the probe plan, the policy's answers, frames, the report, and
the whole run against a fake prober."""

from __future__ import annotations

import ipaddress
import random
import signal
import struct
import threading
from pathlib import Path

import msgspec
import pytest
from agent_doubles import RecordingSink as _Records
from agent_doubles import SilentNotifier as _Notes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit_support import WriteFiles

from hostwall.check import check_policy
from hostwall.cidr import IntervalSet
from hostwall.compile import compile_policy
from hostwall.policy import load_policy
from hostwall.verify.fake import FakeProber
from hostwall.verify.packets import checksum, frame
from hostwall.verify.probes import Element, PolicyIndex, Target, plan_probes, sample
from hostwall.verify.replica import leftover_namespaces
from hostwall.verify.run import destinations, verify

META = "        owner: {owner}\n        reason: r\n        review_by: 2099-01-01\n"
POLICY = (
    "services:\n  https:\n    allow:\n"
    "      - cidr: 203.0.113.0/25\n" + META.format(owner="partner-b")
    + "      - cidr: 203.0.113.128/25\n" + META.format(owner="partner-c")
    + "      - cidr: 2001:db8:10::/48\n" + META.format(owner="it")
    + "  postgres:\n    allow:\n"
    "      - cidr: 10.0.1.0/24\n" + META.format(owner="platform")
    + "  metrics:\n    ports: [9100, \"9200-9300\"]\n    protocols: [tcp]\n    allow:\n"
    "      - cidr: 10.0.9.5/32\n" + META.format(owner="obs")
)


def _policy(write_files: WriteFiles) -> tuple[Path, object]:
    root = write_files({"policy.yaml": POLICY})
    return root, load_policy(root)


def _elements(policy: object) -> list[Element]:
    from hostwall.verify.probes import elements_of

    ruleset = compile_policy(policy)  # type: ignore[arg-type]
    return elements_of(ruleset.sets(), [s.name for s in ruleset.services])


def test_the_plan_probes_both_ends_and_both_sides_of_each_element(write_files: WriteFiles) -> None:
    _, policy = _policy(write_files)
    plan = plan_probes(policy, _elements(policy))  # type: ignore[arg-type]
    https = {(p.address_text, str(p.target)): p.expected for p in plan.probes if p.target.service == "https"}

    # The two /25 entries merge into one element: its ends are admitted, its neighbours not.
    assert https[("203.0.113.0", "443/tcp")] is True
    assert https[("203.0.113.255", "443/udp")] is True
    assert https[("203.0.112.255", "443/tcp")] is False
    assert https[("203.0.114.0", "443/tcp")] is False
    assert https[("::ffff:203.0.113.0", "443/tcp")] is False
    metrics = {str(p.target) for p in plan.probes if p.target.service == "metrics"}
    assert metrics == {"9100/tcp", "9200/tcp", "9300/tcp"}
    unprotected = [p for p in plan.probes if p.target.service is None]
    assert unprotected and all(p.expected for p in unprotected)
    assert {p.target.port for p in unprotected} == {8080}
    assert {p.why for p in plan.probes} >= {"random source", "link-local source", "IPv4-mapped source"}
    assert any(p.family == 6 and p.address_text.startswith("fe80::") for p in plan.probes)
    assert plan.elements_total == plan.elements_probed == 4


def test_above_the_limit_every_service_and_family_keeps_a_share() -> None:
    elements = [Element("big", 4, n * 4, n * 4 + 1) for n in range(1000)]
    elements += [Element("small", 6, n * 4, n * 4) for n in range(3)]
    chosen = sample(elements, 100, random.Random(1))

    assert 95 <= len(chosen) <= 105
    assert {(e.service, e.family) for e in chosen} == {("big", 4), ("small", 6)}
    assert len(sample(elements, 5000, random.Random(1))) == len(elements)


# Addresses crowded into a few blocks, so that entries overlap, touch and nest.
_cidrs4 = st.builds(lambda high, low, length: ipaddress.ip_network((high << 24 | low << 8, length), strict=False),
                    st.sampled_from([11, 45, 203]), st.integers(0, 15), st.integers(8, 32))
_cidrs6 = st.builds(lambda low, length: ipaddress.ip_network((0x2001_0DB8 << 96 | low << 64, length), strict=False),
                    st.integers(0, 15), st.integers(32, 128))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.large_base_example])
@given(st.lists(st.one_of(_cidrs4, _cidrs6), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_the_expected_answer_is_the_answer_check_gives(tmp_path_factory: object, cidrs: list[object],
                                                       rng: random.Random) -> None:
    root = tmp_path_factory.mktemp("p")  # type: ignore[attr-defined]
    entries = "".join(f"      - cidr: {c}\n" + META.format(owner="o") for c in dict.fromkeys(cidrs))
    (root / "policy.yaml").write_text("services:\n  https:\n    allow:\n" + entries)
    policy = load_policy(root)
    index = PolicyIndex(policy)
    plan = plan_probes(policy, _elements(policy), rng=rng)
    for probe in plan.probes:
        decision = check_policy(policy, probe.address_text, str(probe.target))
        assert probe.expected == decision.allowed, probe
        assert index.admits(probe.family, probe.address, probe.target) == decision.allowed


def test_a_correct_replica_agrees(write_files: WriteFiles) -> None:
    _, policy = _policy(write_files)
    ruleset = compile_policy(policy)  # type: ignore[arg-type]
    prober = FakeProber(ruleset)
    report = verify(policy, ruleset.sets(), ruleset.sets(), prober.opened)  # type: ignore[arg-type]

    assert report.agrees and report.probes == prober.sent > 100
    assert report.to_json()["mismatches"] == []


def test_a_missing_element_is_named_with_its_entry(write_files: WriteFiles) -> None:
    root, policy = _policy(write_files)
    ruleset = compile_policy(policy)  # type: ignore[arg-type]
    postgres = ruleset.service("postgres")
    assert postgres is not None
    broken = msgspec.structs.replace(ruleset, services=tuple(
        msgspec.structs.replace(s, v4=IntervalSet.of(4, ())) if s.name == "postgres" else s for s in ruleset.services))
    report = verify(policy, ruleset.sets(), broken.sets(), FakeProber(broken).opened)  # type: ignore[arg-type]

    assert not report.agrees
    rows = {(m.probe.address_text, str(m.probe.target)): m for m in report.mismatches}
    assert set(rows) == {("10.0.1.0", "5432/tcp"), ("10.0.1.255", "5432/tcp")}
    mismatch = rows[("10.0.1.0", "5432/tcp")]
    assert mismatch.row()[:5] == ["10.0.1.0", "5432/tcp", "admitted", "denied",
                                  f"{root / 'policy.yaml'}:18 (platform)"]


def test_the_replica_address_is_never_a_probe_source(write_files: WriteFiles) -> None:
    _, policy = _policy(write_files)
    plan = plan_probes(policy, _elements(policy))  # type: ignore[arg-type]
    taken = msgspec.structs.replace(plan.probes[0], family=4, address=int(ipaddress.ip_address("198.18.0.1")))
    chosen = destinations([*plan.probes, taken])

    assert chosen[4] == "198.18.0.2"
    assert chosen[6] == "2001:db8:ffff::1"


def _reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=80))
def test_checksum_matches_rfc1071(data: bytes) -> None:
    assert checksum(data) == _reference_checksum(data)


def test_frames_carry_valid_checksums() -> None:
    ethernet = bytes(12)
    source, destination = int(ipaddress.ip_address("203.0.113.9")), ipaddress.ip_address("198.18.0.1").packed
    syn = frame(4, source, destination, "tcp", 20000, 443, ethernet)
    header, segment = syn[14:34], syn[34:]
    assert _reference_checksum(header) == 0
    pseudo = header[12:20] + struct.pack("!xBH", 6, len(segment))
    assert _reference_checksum(pseudo + segment) == 0
    assert segment[13] == 0x02 and struct.unpack("!HH", segment[:4]) == (20000, 443)
    six = frame(6, int(ipaddress.ip_address("2001:db8::9")), ipaddress.ip_address("2001:db8:ffff::1").packed,
                "udp", 20001, 443, ethernet)
    datagram = six[54:]
    pseudo6 = six[22:54] + struct.pack("!IxxxB", len(datagram), 17)
    assert six[12:14] == b"\x86\xdd" and _reference_checksum(pseudo6 + datagram) == 0


def test_only_namespaces_of_dead_processes_are_leftovers() -> None:
    alive = {100}.__contains__
    names = ["hwv100-0r", "hwv200-0r", "hwv200-0p", "hw200x1-srv", "hwvx-1r", "other"]
    assert leftover_namespaces(names, alive) == ["hwv200-0r", "hwv200-0p"]


def test_target_text() -> None:
    assert str(Target(443, "udp", "https")) == "443/udp"




def test_the_agent_records_a_failed_verify_after_reload_with_the_catalog_fields(write_files: WriteFiles,
                                                                                 tmp_path: Path) -> None:
    import re as regex

    from hostwall.agent import Agent
    from hostwall.drops import MESSAGE_ID_VERIFY, Record
    from hostwall.engine import Engine
    from hostwall.fake import FakeBackend
    from hostwall.state import StateDir

    _, policy = _policy(write_files)
    ruleset = compile_policy(policy)  # type: ignore[arg-type]
    broken = msgspec.structs.replace(ruleset, services=tuple(
        msgspec.structs.replace(s, v4=IntervalSet.of(4, ())) if s.name == "postgres" else s for s in ruleset.services))
    verified: list[object] = []

    def verify_loaded(loaded: object) -> object:
        verified.append(loaded)
        return verify(loaded, ruleset.sets(), broken.sets(), FakeProber(broken).opened)  # type: ignore[arg-type]

    state = StateDir(tmp_path / "state")
    sink = _Records()
    agent = Agent(Engine(FakeBackend(), state), state, lambda: policy, _Notes(), sink,  # type: ignore[arg-type]
                  verify=verify_loaded)  # type: ignore[arg-type]
    agent.start()
    assert verified == []  # start is not a reload
    agent.reload()

    assert verified == [policy]
    records = [r for r in sink.records if isinstance(r, Record) and r.message_id == MESSAGE_ID_VERIFY]
    assert len(records) == 1
    record = records[0]
    assert record.fields["HOSTWALL_MISMATCHES"] == "2" and record.fields["HOSTWALL_DPORT"] == "5432"
    assert record.fields["HOSTWALL_SRC"] in ("10.0.1.0", "10.0.1.255")
    assert record.fields["HOSTWALL_EXPECTED"] == "admitted" and record.fields["HOSTWALL_OBSERVED"] == "denied"
    catalog = (Path(__file__).resolve().parents[2] / "units" / "hostwall.catalog").read_text()
    section = catalog.split(f"-- {MESSAGE_ID_VERIFY}\n", 1)[1].split("\n-- ", 1)[0]
    assert set(regex.findall(r"@([A-Z0-9_]+)@", section)) <= set(record.fields)


def test_the_entry_involved_is_the_containing_one_else_the_bordering_one(write_files: WriteFiles) -> None:
    from hostwall.verify.report import EntryIndex, printable

    root = write_files({"policy.yaml": (
        "services:\n  https:\n    allow:\n"
        "      - cidr: 10.0.0.0/16\n" + META.format(owner="wide")
        + "      - cidr: 10.0.5.0/24\n" + META.format(owner="inner")
        + "      - cidr: 10.0.200.0/24\n" + META.format(owner="late"))})
    policy = load_policy(root)
    index = EntryIndex(policy)
    https = Target(443, "tcp", "https")

    def named(address: str) -> str:
        probe = msgspec.structs.replace(plan_probes(policy, []).probes[0], family=4,
                                    address=int(ipaddress.ip_address(address)), target=https)
        return index.involved(probe)

    where = root / "policy.yaml"
    assert named("10.0.5.7") == f"{where}:8 (inner)"  # the narrowest entry that contains it
    assert named("10.0.250.1") == f"{where}:4 (wide)"  # after a nested entry, still inside the wide one
    assert named("10.1.0.0") == f"{where}:4 (wide)"  # just above it
    assert named("9.255.255.255") == f"{where}:4 (wide)"  # just below it
    assert named("10.2.0.0") == "-"
    assert printable("a\x1b[31mb\n") == "a\\x1b[31mb\\n"


def test_the_command_line_default_is_the_planner_default() -> None:
    from hostwall.cli import verify as command
    from hostwall.verify import probes

    assert command.DEFAULT_SAMPLES == probes.DEFAULT_SAMPLES


def test_verify_help_names_its_options() -> None:
    from click.testing import CliRunner

    from hostwall.cli import main

    runner = CliRunner()
    assert "--samples" in runner.invoke(main, ["verify", "--help"]).output
    for command in ("apply", "rollback"):
        assert "--verify" in runner.invoke(main, [command, "--help"]).output
    assert "--verify-after-reload" in runner.invoke(main, ["agent", "--help"]).output


class _Terminated(Exception):
    pass


class _EmptySource:
    def __init__(self, netns: str | None) -> None:
        pass

    def list_ruleset(self) -> str:
        return ""

    def close(self) -> None:
        pass


def test_a_signal_during_ip_netns_add_lands_once_the_namespace_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM that arrives while `ip netns add` runs is delivered once it has returned
    and the namespace is recorded, so close() finds and removes it; it does not unwind
    from inside the call, where subprocess may not yet know of the child that goes on
    to add the namespace after close() has looked."""
    from hostwall.verify import replica

    added: list[str] = []

    def ip(*args: str, namespace: str | None = None) -> str:
        if args[:2] == ("netns", "add"):
            # Arrives mid-call; sent to this thread, where the kernel keeps it while it is held
            # (a process-wide one could go to another thread of the test run).
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            added.append(args[2])
            return ""
        raise AssertionError(f"not reached before the signal: ip {args}")

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    monkeypatch.setattr(replica, "ip", ip)
    monkeypatch.setattr(replica, "interface_names", lambda namespace: ["eth0"])
    monkeypatch.setattr(replica, "NftBackend", _EmptySource)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        opening = replica.Replica("source", {4: "192.0.2.1", 6: "2001:db8::1"})
        with pytest.raises(_Terminated):
            opening.open([443], [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert added == [opening.name]
    assert opening._created == [opening.name]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
