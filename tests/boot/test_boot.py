"""The shipped unit, booted for real: systemd as PID 1 of a container made from a Debian
rootfs into which `make install` installed hostwall, with its network in a lab namespace.

A client allowed by the policy and a denied one connect over veth links to a listener
inside the container; the assertions are about what systemd and the kernel do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from boot_support import TIMINGS, Boot, Booted, http_probe, nft_in

from hostwall.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

MESSAGE_ID_DROP = "2eb1441f6d4749cf97f970fefa489cad"
MESSAGE_ID_JOB_DONE = "39f53479d3a045ac8e11786248231fbf"  # systemd: "Started ...", "Reached target ..."
POLICY_FILE = "/etc/hostwall/policies/site.yaml"
PROBE_UNIT = "boot-test-network-pre-probe.service"
PROBE_RESULT = "/run/boot-test-network-pre-probe"
DENY_TIMEOUT = 2.0  # a denied connection costs its whole timeout
OPEN_TIMEOUT = 5.0  # an allowed one returns as soon as it is answered


def policy(*cidrs: str) -> str:
    allow = [{"cidr": cidr, "owner": "boot-test", "reason": "lab client", "review_by": "2099-01-01"}
             for cidr in cidrs]
    return yaml.safe_dump({"services": {"postgres": {"allow": allow}}}, sort_keys=False)


# Ordered after network-pre.target and nothing else: it records whether the table is
# there at the moment the network may start being configured.
PROBE = f"""[Unit]
Description=boot test: is hostwall's table loaded once network-pre.target is reached?
DefaultDependencies=no
After=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'if nft list table inet hostwall >/dev/null; then echo present; else echo missing; fi \
> {PROBE_RESULT}'

[Install]
WantedBy=multi-user.target
"""

WATCHDOG_DROP_IN = """[Service]
WatchdogSec=2
ExecStart=
ExecStart=/usr/local/bin/hostwall agent --test-stall-watchdog-after 1
"""


def wait_for(what: str, condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def generation(machine: Booted) -> int | None:
    status = json.loads(machine.machine.run("hostwall", "status", "--json", check=False).stdout)
    value = status.get("generation")
    return int(value) if value is not None else None


def drop_records(booted: Booted, source: str) -> list[dict[str, str]]:
    lines = booted.machine.journal("-u", "hostwall", "-o", "json", f"MESSAGE_ID={MESSAGE_ID_DROP}",
                                   f"HOSTWALL_SRC={source}").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class TablePoller:
    """`nft list table inet hostwall` in the lab's server namespace, over and over, in a
    thread: how often it was there and how often not."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.present = 0
        self.present_during: list[tuple[float, float]] = []  # (start, end) of each poll that found it
        self.missing: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            result = nft_in(self.namespace, "list", "table", "inet", "hostwall", timeout=10)
            if result.returncode == 0 and "hostwall generation=" in result.stdout:
                self.present += 1
                self.present_during.append((started, time.monotonic()))
            else:
                self.missing.append(f"{time.monotonic():.3f}: {result.stderr.strip()}")
            self._stop.wait(0.02)

    def __enter__(self) -> TablePoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def shipped_files(lab: Lab) -> dict[str, str]:
    return {POLICY_FILE: policy(f"{lab.allowed.ipv4}/32"), f"/etc/systemd/system/{PROBE_UNIT}": PROBE}


@pytest.fixture(scope="module")
def shipped(boot: Boot) -> Iterator[Booted]:
    """The unit exactly as `make install` put it, enabled, with a policy that allows the
    lab's allowed client on 5432; and two listeners in the container (5432, and 8080,
    which no policy protects)."""
    with boot(shipped_files, ("hostwall.service", PROBE_UNIT)) as booted:
        machine = booted.machine
        for port in (5432, 8080):
            machine.run("systemd-run", f"--unit=boot-test-http-{port}", "--property=WorkingDirectory=/usr/share",
                        "python3", "-m", "http.server", str(port), "--bind", "::")
        wait_for("the listeners in the container",
                 lambda: all(f":{p} " in machine.run("ss", "-Hltn").stdout for p in (5432, 8080)), timeout=20)
        yield booted


def test_unit_is_enabled_and_active_after_boot(shipped: Booted) -> None:
    machine = shipped.machine
    assert machine.run("systemctl", "is-enabled", "hostwall", check=False).stdout.strip() == "enabled"
    assert machine.run("systemctl", "is-active", "hostwall", check=False).stdout.strip() == "active", \
        machine.journal("-u", "hostwall")
    shown = machine.show("hostwall", "Type", "NRestarts", "Result", "FragmentPath")
    assert shown == {"Type": "notify", "NRestarts": "0", "Result": "success",
                     "FragmentPath": "/etc/systemd/system/hostwall.service"}
    assert generation(shipped) == 1
    listing = nft_in(shipped.lab.server, "list", "table", "inet", "hostwall")
    assert listing.returncode == 0 and "hostwall generation=1 " in listing.stdout, listing.stderr


def test_table_is_loaded_before_network_pre_target(shipped: Booted) -> None:
    machine = shipped.machine
    assert machine.run("cat", PROBE_RESULT).stdout.strip() == "present", \
        "when network-pre.target was reached, `nft list table inet hostwall` failed"
    entries = [json.loads(line) for line in machine.journal(
        "-b", "-o", "json", f"MESSAGE_ID={MESSAGE_ID_JOB_DONE}", "JOB_TYPE=start").splitlines()]
    first: dict[str, dict[str, Any]] = {}
    for entry in entries:
        first.setdefault(entry.get("UNIT", ""), entry)
    started, reached = first.get("hostwall.service"), first.get("network-pre.target")
    assert started and reached, [e.get("MESSAGE") for e in entries]
    assert started["JOB_RESULT"] == "done"
    # READY=1 (the job's "Started") comes only once the kernel holds the ruleset.
    assert int(started["__MONOTONIC_TIMESTAMP"]) <= int(reached["__MONOTONIC_TIMESTAMP"]), \
        (started["MESSAGE"], reached["MESSAGE"])
    assert entries.index(started) < entries.index(reached)  # journalctl prints in journal order
    shown = {unit: int(machine.show(unit, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"])
             for unit in ("hostwall.service", "network-pre.target")}
    assert 0 < shown["hostwall.service"] <= shown["network-pre.target"], shown


def test_allowed_client_connects_and_denied_one_times_out(shipped: Booted) -> None:
    lab = shipped.lab
    cases = {
        "allowed 5432 (v4)": (lab.allowed.namespace, lab.allowed.server_ipv4, 5432, OPEN_TIMEOUT, "open"),
        "denied 5432 (v4)": (lab.denied.namespace, lab.denied.server_ipv4, 5432, DENY_TIMEOUT, "timeout"),
        "allowed 5432 (v6, not in the policy)": (lab.allowed.namespace, f"{lab.allowed.server_ipv6}", 5432,
                                                 DENY_TIMEOUT, "timeout"),
        "denied 8080 (unprotected)": (lab.denied.namespace, lab.denied.server_ipv4, 8080, OPEN_TIMEOUT, "open"),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(http_probe, *case[:4]) for name, case in cases.items()}
        outcome = {name: future.result() for name, future in futures.items()}
    assert outcome == {name: case[4] for name, case in cases.items()}


def test_drop_records_reach_the_journal_with_their_fields(shipped: Booted) -> None:
    lab = shipped.lab
    assert http_probe(lab.denied.namespace, lab.denied.server_ipv4, 5432, 1.0) == "timeout"
    records = wait_for("a drop record of the denied client",
                       lambda: drop_records(shipped, lab.denied.ipv4), timeout=15)
    record = records[-1]
    expected = {"HOSTWALL_SERVICE": "postgres", "HOSTWALL_SRC": lab.denied.ipv4,
                "HOSTWALL_DST": lab.denied.server_ipv4, "HOSTWALL_DPORT": "5432", "HOSTWALL_PROTO": "tcp",
                "HOSTWALL_IIF": "hwbad", "HOSTWALL_GENERATION": str(generation(shipped)),
                "HOSTWALL_COUNT": "1", "PRIORITY": "5", "SYSLOG_IDENTIFIER": "hostwall",
                "_SYSTEMD_UNIT": "hostwall.service"}
    assert {key: record.get(key) for key in expected} == expected, record
    assert record["HOSTWALL_SRC_PORT"].isdigit()
    assert record["MESSAGE"].startswith(f"dropped tcp {lab.denied.ipv4}:")
    # The allowed client's IPv6 attempt (not in the policy) timed out because hostwall
    # dropped it, not because the path was broken.
    if not drop_records(shipped, lab.allowed.ipv6):
        assert http_probe(lab.allowed.namespace, lab.allowed.server_ipv6, 5432, 1.0) == "timeout"
    v6 = wait_for("a drop record of the allowed client's IPv6 address",
                  lambda: drop_records(shipped, lab.allowed.ipv6), timeout=15)[-1]
    assert (v6["HOSTWALL_DST"], v6["HOSTWALL_IIF"], v6["HOSTWALL_SERVICE"]) == \
        (lab.allowed.server_ipv6, "hwok", "postgres")


def test_journalctl_x_explains_a_drop_record_from_the_catalog(shipped: Booted) -> None:
    lab = shipped.lab
    if not drop_records(shipped, lab.denied.ipv4):
        assert http_probe(lab.denied.namespace, lab.denied.server_ipv4, 5432, 1.0) == "timeout"
        wait_for("a drop record", lambda: drop_records(shipped, lab.denied.ipv4), timeout=15)
    explained = shipped.machine.journal("-x", "-u", "hostwall", f"MESSAGE_ID={MESSAGE_ID_DROP}",
                                        f"HOSTWALL_SRC={lab.denied.ipv4}", "-n", "1")
    assert "Subject: hostwall dropped a packet to a protected port" in explained, explained
    assert f"A packet from {lab.denied.ipv4} to port 5432/tcp (service" in explained, explained
    assert "postgres) arrived on hwbad and was dropped" in explained, explained


def test_reload_applies_a_changed_policy(shipped: Booted) -> None:
    machine, lab = shipped.machine, shipped.lab
    before = generation(shipped)
    assert before == 1
    machine.write(POLICY_FILE, policy(f"{lab.allowed.ipv4}/32", f"{lab.denied.ipv4}/32"))
    reload = machine.run("systemctl", "reload", "hostwall", check=False)
    assert reload.returncode == 0, reload.stderr + machine.journal("-u", "hostwall", "-n", "20")
    wait_for("generation 2", lambda: generation(shipped) == 2, timeout=20)
    assert machine.show("hostwall", "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert http_probe(lab.denied.namespace, lab.denied.server_ipv4, 5432, OPEN_TIMEOUT) == "open"
    assert "Reloaded hostwall.service" in machine.journal("-u", "hostwall")


def _agent_gap(machine: Any) -> tuple[float, float]:
    """Monotonic seconds from the killed agent's exit (systemd's journal record of it) to
    the restarted agent's exec (systemd's ExecMainStartTimestampMonotonic)."""
    entries = [json.loads(line) for line in machine.journal("-o", "json", "-u", "hostwall").splitlines()]
    exits = [e for e in entries if "Main process exited, code=killed" in str(e.get("MESSAGE", ""))]
    assert exits, [e.get("MESSAGE") for e in entries]
    started = machine.show("hostwall", "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"]
    return int(exits[-1]["__MONOTONIC_TIMESTAMP"]) / 1e6, int(started) / 1e6


def test_agent_killed_by_sigabrt_is_restarted_and_the_firewall_stays(shipped: Booted) -> None:
    machine, lab = shipped.machine, shipped.lab
    before = machine.show("hostwall", "NRestarts", "MainPID")
    loaded = generation(shipped)
    with TablePoller(lab.server) as poller:
        time.sleep(0.2)
        machine.run("systemctl", "kill", "--signal=ABRT", "hostwall")
        killed = time.monotonic()
        def restarted() -> dict[str, str] | None:
            shown = machine.show("hostwall", "ActiveState", "MainPID", "NRestarts")
            fresh = shown["ActiveState"] == "active" and shown["MainPID"] not in ("0", before["MainPID"])
            return shown if fresh else None

        after = wait_for("hostwall restarted", restarted, timeout=30)
        time.sleep(0.2)
    TIMINGS.append(f"SIGABRT: restarted in {time.monotonic() - killed:.1f} s; table present in "
                   f"{poller.present} polls, missing in {len(poller.missing)}")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    journal = machine.journal("-u", "hostwall")
    assert "Main process exited, code=killed, status=6/ABRT" in journal, journal
    assert poller.missing == [], poller.missing
    # The table was seen while no agent ran at all: a poll wholly between the old main
    # process's exit and the new one's start (the container shares the host's monotonic clock).
    exited, restarted_at = _agent_gap(machine)
    assert any(exited <= start and end <= restarted_at for start, end in poller.present_during), \
        (exited, restarted_at, poller.present_during)
    assert generation(shipped) == loaded


def test_a_stalled_watchdog_is_detected_and_the_agent_restarted(boot: Boot) -> None:
    def files(lab: Lab) -> dict[str, str]:
        return {POLICY_FILE: policy(f"{lab.allowed.ipv4}/32"),
                "/etc/systemd/system/hostwall.service.d/watchdog.conf": WATCHDOG_DROP_IN}

    with boot(files, ("hostwall.service",)) as booted:
        machine = booted.machine
        assert "--test-stall-watchdog-after 1" in machine.show("hostwall", "ExecStart")["ExecStart"]
        assert machine.show("hostwall", "WatchdogUSec")["WatchdogUSec"] == "2s"
        started = time.monotonic()
        with TablePoller(booted.lab.server) as poller:
            wait_for("a watchdog timeout in the journal",
                     lambda: "hostwall.service: Watchdog timeout" in machine.journal("-u", "hostwall"),
                     timeout=30, interval=0.25)
            timed_out = time.monotonic()
            wait_for("a restart after the watchdog timeout",
                     lambda: int(machine.show("hostwall", "NRestarts")["NRestarts"]) >= 1, timeout=15)
        TIMINGS.append(f"watchdog: timeout seen {timed_out - started:.1f} s after boot, restarted "
                       f"{time.monotonic() - timed_out:.1f} s later; table present in {poller.present} polls, "
                       f"missing in {len(poller.missing)}")
        journal = machine.journal("-u", "hostwall")
        assert "hostwall.service: Failed with result 'watchdog'." in journal, journal
        assert poller.missing == [], poller.missing
        assert poller.present > 0
