"""Benchmark: `hostwall verify` of a seeded policy, from process start to exit.

    .venv/bin/python tests/bench/bench_verify.py [--entries N ...] [--repeat R] [--json PATH]

Needs root. The policy is applied to a namespace hwbench-verify-*; verify copies that
namespace's ruleset into its own replica and probes it there. The target is 10 s for
10k entries (12.5k kernel elements: n IPv4 and n/4 IPv6 prefixes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Figure,
    generate_entries,
    hostwall,
    measure_process,
    median,
    namespaces,
    run,
    workdir,
    write_figures,
    write_policy,
)

TARGET_SECONDS = 10.0
TARGET_ENTRIES = 10_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("/tmp/hostwall-bench-verify.json"))
    args = parser.parse_args()
    if not 1 <= args.repeat <= 20 or not all(1 <= n <= 200_000 for n in args.entries):
        parser.error("--repeat 1-20, --entries 1-200000")
    figures: list[Figure] = []
    name = f"hwbench-verify-{os.getpid()}"
    with namespaces(name), workdir("verify") as work:
        run(["ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        for entries in args.entries:
            policy, state = work / f"policy-{entries}", work / f"state-{entries}"
            write_policy(policy, generate_entries(entries), lists=True)
            run(hostwall(name, policy, state, "apply"))
            runs = [measure_process(hostwall(name, policy, state, "verify", "--json"), timeout=600)
                    for _ in range(args.repeat)]
            report = json.loads(runs[-1].stdout)
            seconds = median([r.seconds for r in runs])
            met = seconds <= TARGET_SECONDS if entries == TARGET_ENTRIES else None
            figures.append(Figure("verify", f"verify, {entries} entries", seconds, "s",
                                  target=f"<= {TARGET_SECONDS:g} s" if met is not None else "", met=met,
                                  note=f"{report['probes']} probes, {report['elements_probed']} of "
                                       f"{report['elements_total']} elements, agrees={report['agrees']}",
                                  extra={"runs": [r.seconds for r in runs],
                                         "peak_kb": max(r.max_rss_kb for r in runs)}))
            print(f"{entries:>7} entries: {seconds:6.2f} s (median of {len(runs)}), {figures[-1].note}", flush=True)
    write_figures(args.json, figures)
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
