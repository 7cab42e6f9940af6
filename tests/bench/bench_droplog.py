"""Benchmark: drop logging under a flood. A denied client namespace sends bounded
floods of UDP datagrams to 443 in the server namespace, where `hostwall agent`
(--netns) reads the drop logs and writes them to journald.

    sudo .venv/bin/python tests/bench/bench_droplog.py [--packets N] [--rates 50000,0] [--json PATH]

Each flood (N datagrams at a given rate, 0 = as fast as the sender goes, each at most
60 s) runs against an agent of its own, started after the policy is loaded and
stopped (SIGTERM) a moment after the flood ends, so that its final record says
exactly what it read: HOSTWALL_DROPS_READ and HOSTWALL_LOST_TOTAL (the sequence gaps
and buffer overruns the reader saw). Per flood:

  dropped   the rule's counter (https_dropped) before and after
  received  drop events the agent's reader received
  lost      dropped minus received; at rates above the policy's log_rate the kernel's
            limit statement accounts for part of it by design
  records   drop records the agent wrote to the journal (bounded by its flood control)
  CPU, RSS  the agent's user+system time during the flood, its RSS before and after

The policy sets log_rate and log_burst to their maximum (100000), so that below
that rate every drop is logged; the target is no loss at 50k drops/s.
journald is the running one, or started by hand for the run (hostwall.lab).
Only namespaces named hwbench-* are created and removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    HOSTWALL,
    Figure,
    build_loadgen,
    format_profile,
    generate_entries,
    hostwall,
    in_netns,
    link,
    namespaces,
    profile_report,
    root_tables,
    run,
    workdir,
    write_figures,
    write_policy,
)

PORT = 443
# Events NFLOG never numbered were dropped in the kernel before logging, not by the reader.
UNNUMBERED = " (no sequence gap: the rest went in the kernel before NFLOG numbered them, e.g. at the log limit)"
TICKS = os.sysconf("SC_CLK_TCK")


def dropped_counter(server: str) -> int:
    listing = json.loads(run(in_netns(server, "nft", "-j", "list", "counter", "inet", "hostwall",
                                      "https_dropped")).stdout)
    return int(next(i["counter"]["packets"] for i in listing["nftables"] if "counter" in i))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def memory_kb(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}


def journal_records(pid: int) -> list[dict[str, Any]]:
    from hostwall.drops import MESSAGE_ID_AGENT

    output = run(["journalctl", "--no-pager", "-o", "json", f"_PID={pid}"]).stdout
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    return [r for r in records if r.get("MESSAGE_ID") != MESSAGE_ID_AGENT or "stopped" in str(r.get("MESSAGE"))]


def flood(loadgen: Path, client: str, server_ip: str, packets: int, rate: int, server: str, policy: Path,
          state: Path, profile_to: Path | None = None) -> dict[str, Any]:
    from hostwall.drops import MESSAGE_ID_AGENT, MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY

    (state / "agent.json").unlink(missing_ok=True)
    command = hostwall(server, policy, state, "agent", "--full-check-interval", "3600")
    if profile_to is not None:  # the agent stops on SIGTERM by returning, so cProfile writes its file
        command = [sys.executable, "-m", "cProfile", "-o", str(profile_to), *command[1:]]
    agent = subprocess.Popen(command,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (state / "agent.json").exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: {agent.stderr.read().decode() if agent.stderr else ''}")
            time.sleep(0.1)
        time.sleep(1.0)
        before = {"dropped": dropped_counter(server), "cpu": cpu_seconds(agent.pid), **memory_kb(agent.pid)}
        output = run(in_netns(client, str(loadgen), "udp", server_ip, str(PORT), str(packets), str(rate), "60"),
                     timeout=90).stdout.split()
        sent, elapsed = int(output[0]), float(output[1])
        time.sleep(1.5)  # the reader drains what is queued (the kernel flushes a batch within 100 ms)
        after = {"dropped": dropped_counter(server), "cpu": cpu_seconds(agent.pid), **memory_kb(agent.pid)}
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()  # by its PID; only when it did not stop by itself
            agent.wait(timeout=30)
    records = journal_records(agent.pid)
    stopped = [r for r in records if r.get("MESSAGE_ID") == MESSAGE_ID_AGENT]
    if not stopped:
        raise RuntimeError("the agent's final record is not in the journal")
    received, reader_lost = int(stopped[-1]["HOSTWALL_DROPS_READ"]), int(stopped[-1]["HOSTWALL_LOST_TOTAL"])
    dropped = after["dropped"] - before["dropped"]
    return {
        "rate_asked": rate, "sent": sent, "seconds": elapsed, "sent_per_s": sent / elapsed,
        "dropped": dropped, "received": received, "received_per_s": received / elapsed,
        "lost": dropped - received, "reader_lost": reader_lost,
        "drop_records": sum(r.get("MESSAGE_ID") in (MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY) for r in records),
        "journal_records": len(records) - len(stopped),
        "agent_cpu_s": after["cpu"] - before["cpu"],
        "rss_kb_before": before["VmRSS"], "rss_kb_after": after["VmRSS"], "hwm_kb": after["VmHWM"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--rates", default="50000,0", help="datagrams per second, 0 = as fast as possible")
    parser.add_argument("--entries", type=int, default=1_000)
    parser.add_argument("--profile", action="store_true", help="profile (cProfile) the agent where a target is missed")
    parser.add_argument("--json", type=Path, default=Path("/tmp/hostwall-bench-droplog.json"))
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    if not 1 <= args.packets <= 1_000_000 or any(not 0 <= r <= 10_000_000 for r in rates):
        parser.error("--packets 1-1M, rates 0-10M")
    from hostwall.lab import journald

    before = root_tables()
    pid = os.getpid()
    results = []
    with journald(), workdir("droplog") as work, \
            namespaces(f"hwbench-{pid}-srv", f"hwbench-{pid}-bad") as (server, client):
        lab = link(server, client, 1)
        loadgen = build_loadgen(work)
        policy, state = work / "policy", work / "state"
        write_policy(policy, generate_entries(args.entries), lists=True,
                     settings={"log_rate": 100_000, "log_burst": 100_000})
        run(hostwall(server, policy, state, "apply", "-m", "bench"))
        for rate in rates:
            result = flood(loadgen, client, lab.server_ipv4, args.packets, rate, server, policy, state)
            results.append(result)
            if args.profile and rate and rate <= 50_000 and result["lost"]:
                print("  target missed: the same flood again with the agent under cProfile", flush=True)
                result["profile"] = profile_report(work / "agent.prof", lambda path, rate=rate: flood(
                    loadgen, client, lab.server_ipv4, args.packets, rate, server, policy, state, path))
                print(format_profile(result["profile"]), flush=True)
            print(f"  {rate or 'max':>6}/s asked: sent {result['sent']} at {result['sent_per_s']:.0f}/s, "
                  f"dropped {result['dropped']}, received {result['received']} ({result['received_per_s']:.0f}/s), "
                  f"lost {result['lost']} (reader saw {result['reader_lost']}), {result['journal_records']} records, "
                  f"agent CPU {result['agent_cpu_s']:.2f} s, RSS {result['rss_kb_before'] // 1024}->"
                  f"{result['rss_kb_after'] // 1024} MB", flush=True)
    if root_tables() != before:
        print("warning: the root namespace's tables changed during the run (another process?)", file=sys.stderr)
    figures = []
    group = "5 drop logging"
    for result in results:
        label = f"{result['sent_per_s'] / 1000:.0f}k/s" + ("" if result["rate_asked"] else " (as fast as sent)")
        target = result["rate_asked"] and result["rate_asked"] <= 50_000
        figures.append(Figure(
            group, f"flood {result['sent'] // 1000}k at {label}: events lost", result["lost"], "events",
            reference=result["dropped"], reference_name="dropped (rule counter)",
            target="== 0" if target else "", met=(result["lost"] == 0) if target else None,
            note=(f"received {result['received']}, gaps seen by the reader {result['reader_lost']}"
                  + (UNNUMBERED if result["lost"] and not result["reader_lost"] else "")
                  + f"; {result['journal_records']} journal records; agent CPU {result['agent_cpu_s']:.1f} s, "
                  f"RSS {result['rss_kb_before'] // 1024}->{result['rss_kb_after'] // 1024} MB"),
            extra=result))
    write_figures(args.json, figures, {"results": results, "hostwall": HOSTWALL})
    return 0


if __name__ == "__main__":
    sys.exit(main())
