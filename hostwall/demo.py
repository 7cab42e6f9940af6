"""`hostwall demo`: the whole data path in a throw-away namespace lab.

A server namespace runs echo services on 443 (tcp+udp), 5432 and 8080; hostwall loads a
policy that allows one client; both clients then try every port over IPv4 and IPv6.
The host's own firewall is never touched: every kernel call goes to the lab's namespace.
"""

from __future__ import annotations

import contextlib
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from msgspec import Struct

from hostwall import clock, lab
from hostwall.agent import DropStreamer, InterfaceNames, run_streamer
from hostwall.check import check_policy
from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY, DropReporter, FloodControl
from hostwall.engine import Engine
from hostwall.journal import JournalSink, read_entries
from hostwall.nflog import NflogReader, NflogSettings
from hostwall.nft import NftBackend
from hostwall.policy import Policy, load_policy
from hostwall.state import StateDir

DEMO_POLICY = """\
# The demo's allowlist: only the "ok" client may reach the protected ports.
services:
  https:
    allow:
      - cidr: {ok4}/32
        owner: demo
        reason: the allowed client of the lab (IPv4)
        review_by: 2099-01-01
      - cidr: {ok6}/128
        owner: demo
        reason: the allowed client of the lab (IPv6)
        review_by: 2099-01-01
  postgres:
    # IPv4 only: the allowed client's IPv6 address must still be denied on 5432.
    allow:
      - cidr: {ok_net}/24
        owner: demo
        reason: the allowed client's subnet
        review_by: 2099-01-01
"""


class Attempt(Struct, frozen=True):
    client: str
    source: str
    target: str
    result: str
    expected: str

    @property
    def as_expected(self) -> bool:
        return self.result == self.expected


def run_demo(echo: Callable[[str], None] = print) -> bool:
    with lab.journald() as started_journald, lab.running_lab() as net, \
            tempfile.TemporaryDirectory(prefix="hostwall-demo-") as tmp:
        if started_journald.process is not None:
            echo("journald was not running (no systemd as PID 1): started it for the demo\n")
        policy_dir = Path(tmp) / "policies"
        policy_dir.mkdir()
        ok = net.allowed
        (policy_dir / "demo.yaml").write_text(DEMO_POLICY.format(
            ok4=ok.ipv4, ok6=ok.ipv6, ok_net=ok.ipv4.rsplit(".", 1)[0] + ".0"))
        echo(f"lab: server namespace {net.server}; clients {ok.namespace} (allowed) "
             f"and {net.denied.namespace} (denied)")
        echo("policy:\n" + textwrap.indent((policy_dir / "demo.yaml").read_text(), "  "))

        policy = load_policy(policy_dir)
        engine = Engine(NftBackend(net.server), StateDir(Path(tmp) / "state"))
        result = engine.apply(policy, user="demo", message="demo")
        echo(f"applied generation {result.generation}: {result.plan.summary}\n")

        began = clock.now()
        with _streaming_drops(net.server, StateDir(Path(tmp) / "state"), policy.settings.log_group):
            attempts = _attempts(net, policy)
            time.sleep(0.3)  # the kernel flushes a partial batch of logs within 100 ms
        echo("expected = what `hostwall check` says from the policy; result = real connections")
        echo(f"{'client':<8} {'source':<14} {'target':<24} {'result':<8} expected")
        for attempt in attempts:
            mark = "" if attempt.as_expected else "   <-- UNEXPECTED"
            echo(f"{attempt.client:<8} {attempt.source:<14} {attempt.target:<24} "
                 f"{attempt.result:<8} {attempt.expected}{mark}")

        status = engine.status()
        echo("\ncounters in the kernel:")
        for service in status.services:
            echo(f"  {service.name:<10} accepted {service.accepted.packets:>4} packets, "
                 f"dropped {service.dropped.packets:>4} packets")
        denied = sum(1 for a in attempts if a.expected == "timeout")
        # journald makes records readable when it gets to them: on a busy host that can
        # take a moment, so wait for them (bounded) rather than report a short count.
        deadline = time.monotonic() + 10
        while True:
            records = list(read_entries(message_ids=(MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY),
                                        matches={"HOSTWALL_NETNS": net.server}, since=began))
            if len(records) >= denied or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        echo(f"\ndrops in the journal ({len(records)} records; `journalctl -o verbose "
             f"HOSTWALL_NETNS={net.server}` shows every field):")
        for record in records:
            echo(f"  {record.message}")
        if len(records) < denied:
            echo(f"  expected at least {denied} drop records, one per denied attempt")
        good = all(a.as_expected for a in attempts) and len(records) >= denied
        echo("\ndemo " + ("passed: every connection did what the policy says"
                          if good else "FAILED: see UNEXPECTED lines"))
        return good


@contextlib.contextmanager
def _streaming_drops(namespace: str, state: StateDir, group: int) -> Iterator[None]:
    """The agent's drop streamer, in a thread, for the lab's server namespace."""
    reader = NflogReader(NflogSettings(group=group), namespace)
    sink = JournalSink({"HOSTWALL_NETNS": namespace})

    def generation() -> int | None:
        current = state.current()
        return current.generation if current else None

    streamer = DropStreamer(reader, sink, DropReporter(FloodControl(), time.monotonic),
                            InterfaceNames(namespace), generation)
    stop = threading.Event()
    thread = threading.Thread(target=run_streamer, args=(streamer, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        reader.close()


def _attempts(net: lab.Lab, policy: Policy) -> list[Attempt]:
    attempts = []
    for name, host in (("allowed", net.allowed), ("denied", net.denied)):
        for source, server in ((host.ipv4, host.server_ipv4), (host.ipv6, host.server_ipv6)):
            shown = f"[{server}]" if ":" in server else server
            for port, protocol in ((443, "tcp"), (443, "udp"), (5432, "tcp"), (8080, "tcp")):
                probe = lab.probe_tcp if protocol == "tcp" else lab.probe_udp
                result = probe(host.namespace, server, port, 1.0)
                allowed = check_policy(policy, source, f"{port}/{protocol}").allowed
                expected = "open" if allowed else "timeout"
                attempts.append(Attempt(name, source, f"{shown}:{port}/{protocol}", result, expected))
    return attempts
