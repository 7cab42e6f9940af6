"""Benchmark: full loads and rollback, end to end, against the kernel's limit.

    sudo .venv/bin/python tests/bench/bench_apply.py [--sizes 1000,10000,100000] [--large] [--repeat R]

For each policy, `hostwall apply` runs as a process of its own (interpreter start-up,
parse, validate, compile, record, submit) into a namespace without a hostwall table
and with a fresh state directory, so every `file:` list is parsed, not taken from the
cache. The limit is `nft -f` of the text whose load sends the very messages hostwall's
netlink batch holds (tests/netns/test_netns_fast_load.py checks them byte for byte):
the clearing commands for a table that is not there (render_clearing) and the
generation's full load (render_full_load), into the same empty namespace. Peak RSS
and CPU time (user + system) are each process's own (getrusage of the waited child).

Policies (fixed seed, tests/bench/common.py): N IPv4 and N/4 IPv6 prefixes split
over https (443) and postgres (5432),
  lists    as `file:` lists, one per service: N = 1k, 10k, 100k (300k with --large)
  overlap  the same with 10% of the entries inside earlier ones, at 100k
  inline   every entry in YAML with owner, reason and review date, at 10k

For the inline policy, its floor as well: a fresh interpreter importing every module
that apply imported (read off -X importtime) and nothing else, alternating with nft -f
and a bare interpreter. No Python apply of that policy starts faster.

Rollback: with generation 1 (100k) and a later full load of the same entries with
another log rate in the kernel, `hostwall rollback --to 1` against nft -f of the
clearing commands for that table plus generation 1's recorded text.

Only this benchmark's namespace (hwbench-PID-apply) is touched and it is removed at
the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Figure,
    clearing_for,
    compile_hostwall,
    format_profile,
    generate_entries,
    hostwall,
    in_netns,
    measure_process,
    median,
    namespaces,
    profile,
    ratio_figure,
    recorded_transaction,
    root_tables,
    run,
    workdir,
    write_figures,
    write_policy,
)


def drop_table(netns_name: str) -> None:
    run(in_netns(netns_name, "nft", "flush", "ruleset"))


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def full_load(netns_name: str, work: Path, policy: Path, label: str, repeat: int, details: dict[str, object]
              ) -> tuple[float, float, int, int, float, float]:
    """(hostwall seconds, nft seconds, hostwall peak kB, nft peak kB, hostwall CPU seconds,
    nft CPU seconds), medians."""
    runs: dict[str, list[float]] = {"hostwall": [], "nft": [], "hostwall_kb": [], "nft_kb": [], "hostwall_cpu": [],
                                    "nft_cpu": []}
    for index in range(repeat):
        state = work / f"state-{index}"
        drop_table(netns_name)
        applied = measure_process(hostwall(netns_name, policy, state, "apply", "-m", "bench"))
        limit_file = work / "limit.nft"
        drop_table(netns_name)
        # The clearing commands for a namespace without the table, as the backend sends them.
        limit_file.write_text(clearing_for(netns_name) + recorded_transaction(state))
        limit = measure_process(in_netns(netns_name, "nft", "-f", str(limit_file)))
        runs["hostwall"].append(applied.seconds)
        runs["nft"].append(limit.seconds)
        runs["hostwall_kb"].append(applied.max_rss_kb)
        runs["nft_kb"].append(limit.max_rss_kb)
        runs["hostwall_cpu"].append(applied.cpu_seconds)
        runs["nft_cpu"].append(limit.cpu_seconds)
        shutil.rmtree(state)
        print(f"  {label}: hostwall apply {applied.seconds:.3f} s (CPU {applied.cpu_seconds:.3f} s, "
              f"{applied.max_rss_kb // 1024} MB), nft -f {limit.seconds:.3f} s (CPU {limit.cpu_seconds:.3f} s, "
              f"{limit.max_rss_kb // 1024} MB)", flush=True)
    details[label] = runs
    return (median(runs["hostwall"]), median(runs["nft"]), int(median(runs["hostwall_kb"])),
            int(median(runs["nft_kb"])), median(runs["hostwall_cpu"]), median(runs["nft_cpu"]))


def profile_apply(netns_name: str, work: Path, policy: Path) -> dict[str, Any]:
    drop_table(netns_name)
    state = work / "state-profile"
    try:
        return profile(["--netns", netns_name, "--policy-dir", str(policy), "--state-dir", str(state),
                        "apply", "-m", "profile"], work / "apply.prof")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def start_up_floor(netns_name: str, work: Path, policy: Path, repeat: int) -> tuple[float, float, float, int]:
    """(the interpreter importing what an apply of policy imports, nft -f of that apply's
    text, the interpreter alone, the importing process's peak kB), medians of alternating
    runs: what a Python apply of this policy costs before its first step of work."""
    drop_table(netns_name)
    state = work / "state-floor"
    traced = run([sys.executable, "-X", "importtime", *hostwall(netns_name, policy, state, "apply", "-m", "bench")[1:]])
    shutil.rmtree(state)
    # -X importtime names every module as its import ends, in order.
    names = [line.rpartition("|")[2].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")]
    names = list(dict.fromkeys(name for name in names if all(part.isidentifier() for part in name.split("."))))
    importer = work / "imports.py"
    importer.write_text("import importlib\n"
                        f"for name in {names!r}:\n"
                        "    try:\n"
                        "        importlib.import_module(name)\n"
                        "    except ImportError:  # another platform's module, tried and not found\n"
                        "        pass\n")
    runs: dict[str, list[float]] = {"imports": [], "nft": [], "bare": [], "kb": []}
    for _ in range(repeat):
        imported = measure_process([sys.executable, str(importer)])
        drop_table(netns_name)
        limit = measure_process(in_netns(netns_name, "nft", "-f", str(work / "limit.nft")))
        runs["imports"].append(imported.seconds)
        runs["kb"].append(imported.max_rss_kb)
        runs["nft"].append(limit.seconds)
        runs["bare"].append(measure_process([sys.executable, "-c", "pass"]).seconds)
    return median(runs["imports"]), median(runs["nft"]), median(runs["bare"]), int(median(runs["kb"]))


def rollback(netns_name: str, work: Path, n: int, repeat: int, details: dict[str, object]) -> tuple[float, float]:
    entries = generate_entries(n)
    policy, state = work / "policy", work / "state-rollback"
    drop_table(netns_name)
    write_policy(policy, entries, lists=True, settings={"log_rate": 10})
    run(hostwall(netns_name, policy, state, "apply", "-m", "generation 1"))
    write_policy(policy, entries, lists=True, settings={"log_rate": 11})
    runs: dict[str, list[float]] = {"hostwall": [], "nft": [], "hostwall_cpu": [], "nft_cpu": []}
    for _ in range(repeat):
        run(hostwall(netns_name, policy, state, "apply", "-m", "another log rate"))
        rolled = measure_process(hostwall(netns_name, policy, state, "rollback", "--to", "1"))
        run(hostwall(netns_name, policy, state, "apply", "-m", "another log rate"))
        limit_file = work / "limit.nft"
        limit_file.write_text(clearing_for(netns_name) + recorded_transaction(state, 1))
        limit = measure_process(in_netns(netns_name, "nft", "-f", str(limit_file)))
        runs["hostwall"].append(rolled.seconds)
        runs["nft"].append(limit.seconds)
        runs["hostwall_cpu"].append(rolled.cpu_seconds)
        runs["nft_cpu"].append(limit.cpu_seconds)
        print(f"  rollback {size_label(n)}: hostwall {rolled.seconds:.3f} s (CPU {rolled.cpu_seconds:.3f} s), "
              f"nft -f {limit.seconds:.3f} s (CPU {limit.cpu_seconds:.3f} s)", flush=True)
    details["rollback"] = runs
    return median(runs["hostwall"]), median(runs["nft"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,10000,100000", help="IPv4 entries of the file-list policies")
    parser.add_argument("--large", action="store_true", help="also 300k (a few minutes more)")
    parser.add_argument("--target-size", type=int, default=100_000,
                        help="the size the targets and the overlap and rollback figures use")
    parser.add_argument("--inline-size", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile (cProfile) each apply that misses its target")
    parser.add_argument("--json", type=Path, default=Path("/tmp/hostwall-bench-apply.json"))
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.target_size} | ({300_000} if args.large else set()))
    if not 1 <= args.repeat <= 20 or max(sizes) > 1_000_000:
        parser.error("--repeat 1-20, sizes up to 1M")
    compile_hostwall()
    before = root_tables()
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    group = "1 full apply"
    target_n, inline_n = args.target_size, args.inline_size
    # Issue 20: at most 1.0x nft -f from the target size up.
    cases = [(f"{size_label(n)} file lists", n, {"lists": True}, 1.0 if n >= target_n else None) for n in sizes]
    cases += [(f"{size_label(target_n)} file lists, 10% overlaps", target_n, {"lists": True, "overlap": 0.1}, None),
              (f"{size_label(inline_n)} inline YAML entries with metadata", inline_n, {"lists": False}, 2.0)]
    with workdir("apply") as work, namespaces(f"hwbench-{os.getpid()}-apply") as (netns_name,):
        for label, n, variant, at_most in cases:
            policy = work / f"policy-{len(figures)}"
            write_policy(policy, generate_entries(n, overlap=float(variant.get("overlap", 0.0))),
                         lists=bool(variant["lists"]))
            seconds, limit, kb, limit_kb, cpu, limit_cpu = full_load(netns_name, work, policy, label, args.repeat,
                                                                      details)
            ipv6 = f" (+{size_label(n // 4)} IPv6)" if "overlap" not in variant else ""
            # Runs alternate, so each pair shares the machine's state of the moment: the
            # median of the pairs' ratios is steadier than the ratio of the medians on a
            # shared machine, and it is reported beside it.
            runs = details[label]
            pairs = median([ours / theirs for ours, theirs in zip(runs["hostwall"], runs["nft"], strict=True)])
            figure = ratio_figure(group, f"hostwall apply, {label}{ipv6}", seconds, limit, "nft -f of its text", "s",
                                  at_most=at_most, note=f"median of the pairs' ratios {pairs:.2f}x, "
                                  f"peak RSS {kb // 1024} MB vs nft {limit_kb // 1024} MB, "
                                  f"CPU {cpu:.3f} s vs {limit_cpu:.3f} s ({cpu / limit_cpu:.2f}x)",
                                  extra={"peak_kb": kb, "nft_peak_kb": limit_kb, "cpu": cpu, "nft_cpu": limit_cpu,
                                         "pair_ratio": pairs})
            figures.append(figure)
            if args.profile and figure.met is False:
                figure.extra["profile"] = profile_apply(netns_name, work, policy)
                print(format_profile(figure.extra["profile"]), flush=True)
            if not variant["lists"]:
                floor, limit, bare, floor_kb = start_up_floor(netns_name, work, policy, args.repeat)
                figures.append(ratio_figure(
                    group, "  its floor: the interpreter and that apply's imports, no work", floor, limit,
                    "nft -f of its text", "s", note=f"the interpreter alone {bare * 1000:.0f} ms; "
                    f"peak RSS {floor_kb // 1024} MB", extra={"interpreter": bare, "peak_kb": floor_kb}))
            shutil.rmtree(policy)
        seconds, limit = rollback(netns_name, work, target_n, args.repeat, details)
        figures.append(ratio_figure("3 rollback", f"hostwall rollback to a {size_label(target_n)} generation",
                                    seconds, limit, "nft -f of its text", "s", at_most=1.5,
                                    note="replaces a loaded table of the same size"))
    if root_tables() != before:
        print("warning: the root namespace's tables changed during the run (another process?)", file=sys.stderr)
    write_figures(args.json, figures, details)
    for figure in figures:
        ratio = f"{figure.ratio:.2f}x" if figure.ratio is not None else ""
        print(f"{figure.name:<62}{figure.value:>8.3f} s {figure.reference or 0:>8.3f} s {ratio:>7}  "
              f"{figure.target} {figure.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
