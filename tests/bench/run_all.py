"""Every hostwall benchmark in one run, one table: each figure, its ratio and its target.

    sudo .venv/bin/python tests/bench/run_all.py [--large] [--quick] [--only apply,packet] [--json PATH]

(`sudo make bench` runs this.) Each benchmark is a process of its own that creates its
own network namespaces (hwbench-*) and removes them at the end, also on failure:

  apply    1 full `hostwall apply` of 1k/10k/100k file lists, 10% overlaps, 10k inline
           YAML, each vs nft -f of the text it submitted; 3 rollback of 100k
           (bench_apply.py; --large adds 300k)
  delta    2 one entry of a 100k set changed, vs a full reload and vs nft add element
           (bench_delta.py)
  packet   4 TCP connections/s with the 100k policy vs no firewall (decided by pairs against
           its table made dormant), the earlier set layout and 10k one-rule-per-address
           rules (bench_packet.py)
  droplog  5 a 200k-datagram flood at 50k/s and as fast as sent, against the agent
           and journald (bench_droplog.py)
  cli      6 `hostwall --help` and `hostwall validate` start-up (bench_cli.py)

Where a target is missed, the benchmark profiles the command with cProfile and the
hot spots are printed and kept in the JSON. Ratios are measured in the same run; the
machine's load average is recorded before and after each benchmark, since the
figures are only as good as the machine was quiet. --quick uses small policies, for
trying the suite out: its figures are not the targets' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Figure, compile_hostwall, environment, ratio_figure, read_figures

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("apply", "delta", "packet", "droplog", "cli")


def delta_figures(path: Path) -> list[Figure]:
    """bench_delta.py's own JSON (its 100k IPv4 scenario) as figures of this table."""
    scenario = json.loads(path.read_text())["scenarios"][0]
    rows = {key: row["median_ms"] for key, row in scenario["rows"].items()}
    nft_single = (rows["nft_add"] + rows["nft_delete"]) / 2
    nft_prefix = (rows["nft_add_prefix"] + rows["nft_delete_prefix"]) / 2
    fresh = rows["fresh_False"]  # as the command runs; the gc.freeze() variant is only reported
    group = "2 delta (100k)"
    inline = rows["inline"]
    return [
        Figure(group, "1-entry change, hostwall apply (in-process)", inline, "ms", target="<= 50 ms",
               met=inline <= 50, note="an inline entry added or removed; median"),
        Figure(group, "  the same in a fresh process, after imports", fresh, "ms", target="<= 50 ms",
               met=fresh <= 50, note=f"socket release at exit: {rows['fresh_release']:.0f} ms more"),
        Figure(group, "full reload, hostwall apply", rows["full"], "ms", reference=inline,
               reference_name="1-entry change", target=">= 20x", met=rows["full"] / inline >= 20),
        Figure(group, "nft add/delete element, same set (a /32: the hash set)", nft_single, "ms",
               reference=inline, reference_name="1-entry change", target=">= 15x", met=nft_single / inline >= 15),
        Figure(group, "nft add/delete element, a /30 (the interval set)", nft_prefix, "ms", reference=inline,
               reference_name="1-entry change", target=">= 15x", met=nft_prefix / inline >= 15),
        Figure(group, "1 line of the 100k list file replaced", rows["list"], "ms", reference=inline,
               reference_name="1-entry change", note="new content: parsed where it changed"),
        Figure(group, "kernel's own commit of one element", rows["kernel"], "ms", reference=inline,
               reference_name="1-entry change", note="NetlinkTable.apply_delta alone"),
        ratio_figure(group, "1 list line replaced, whole hostwall apply process", rows["whole_list"],
                     rows["whole_nft"], "nft add/delete element, whole process", "ms", at_most=1.0,
                     note="alternating, start to exit"),
        ratio_figure(group, "1 inline entry, whole hostwall apply process", rows["whole_inline"],
                     rows["whole_nft"], "nft add/delete element, whole process", "ms",
                     note="the policy file is validated again"),
    ]


def command_for(name: str, output: Path, args: argparse.Namespace) -> list[str]:
    python = sys.executable
    profile = [] if args.no_profile else ["--profile"]
    if name == "apply":
        sizes = ["--sizes", "1000,10000", "--target-size", "10000", "--inline-size", "2000", "--repeat", "1"] \
            if args.quick else []
        return [python, str(HERE / "bench_apply.py"), "--json", str(output), *sizes, *profile,
                *(["--large"] if args.large else [])]
    if name == "delta":
        repeat = "1" if args.quick else "3"
        return [python, str(HERE / "bench_delta.py"), "--scenario", "v4", "--repeat", repeat, "--json", str(output)]
    if name == "packet":
        quick = ["--entries", "10000", "--rounds", "1", "--seconds", "2", "--pairs", "4"] if args.quick else []
        return [python, str(HERE / "bench_packet.py"), "--json", str(output), *quick]
    if name == "droplog":
        quick = ["--packets", "20000"] if args.quick else []
        return [python, str(HERE / "bench_droplog.py"), "--json", str(output), *quick, *profile]
    return [python, str(HERE / "bench_cli.py"), "--json", str(output), *(["--repeat", "3"] if args.quick else []),
            *profile]


def format_value(figure: Figure) -> str:
    if figure.unit == "s":
        return f"{figure.value:.3f} s"
    if figure.unit == "ms":
        return f"{figure.value:.1f} ms"
    return f"{figure.value:,.0f} {figure.unit}"


def format_ratio(figure: Figure) -> str:
    ratio = figure.ratio
    if ratio is None:
        return ""
    if figure.unit == "events":
        return f"{ratio:.2%}"
    return f"{ratio:.3f}" if figure.unit == "conn/s" else f"{ratio:.2f}x"


def table(figures: list[Figure]) -> str:
    lines = [f"{'figure':<66}{'value':>14}  {'ratio':>8}  {'vs':<24}{'target':<10}{'':<7}note",
             "-" * 160]
    group = None
    for figure in figures:
        if figure.group != group:
            group = figure.group
            lines.append(f"[{group}]")
        verdict = {True: "met", False: "MISSED", None: ""}[figure.met]
        reference = figure.reference_name if figure.ratio is not None else ""
        lines.append(f"{figure.name:<66}{format_value(figure):>14}  {format_ratio(figure):>8}  {reference:<24}"
                     f"{figure.target:<10}{verdict:<7}{figure.note}")
    return "\n".join(lines)


def markdown(figures: list[Figure]) -> str:
    lines = ["| figure | value | ratio | target | |", "|---|---|---|---|---|"]
    for figure in figures:
        ratio = f"{format_ratio(figure)} vs {figure.reference_name}" if figure.ratio is not None else ""
        verdict = {True: "met", False: "**missed**", None: ""}[figure.met]
        lines.append(f"| {figure.group[0]}. {figure.name.strip()} | {format_value(figure)} | {ratio} | "
                     f"{figure.target} | {verdict} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"some of {', '.join(BENCHMARKS)}")
    parser.add_argument("--large", action="store_true", help="also the 300k full apply (a few minutes more)")
    parser.add_argument("--quick", action="store_true", help="small policies and few repeats, to try it out")
    parser.add_argument("--no-profile", action="store_true", help="do not profile missed targets")
    parser.add_argument("--json", type=Path, default=REPO / "bench-results.json")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name]
    if unknown := set(chosen) - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        print("the benchmarks need root (network namespaces, nf_tables): sudo make bench", file=sys.stderr)
        return 2
    compile_hostwall()
    figures: list[Figure] = []
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hwbench-results-") as scratch:
        for name in BENCHMARKS:
            if name not in chosen:
                continue
            output = Path(scratch) / f"{name}.json"
            command = command_for(name, output, args)
            print(f"== {name}: {' '.join(Path(c).name if c.startswith('/') else c for c in command[1:])}", flush=True)
            load_before, started = os.getloadavg(), time.monotonic()
            result = subprocess.run(command, check=False, timeout=3600)
            runs[name] = {"exit": result.returncode, "seconds": time.monotonic() - started,
                          "load_before": load_before, "load_after": os.getloadavg()}
            if not output.exists():
                runs[name]["exit"] = result.returncode or 2
                print(f"== {name} failed (exit {result.returncode}): no figures", file=sys.stderr, flush=True)
                continue
            figures += delta_figures(output) if name == "delta" else read_figures(output)
            runs[name]["details"] = json.loads(output.read_text())
    figures.sort(key=lambda f: f.group[0])
    env = environment()
    header = (f"kernel {env['kernel']}, {env['nft']}, Python {env['python']}, {env['cpus']} CPUs; load average "
              + ", ".join(f"{n} {r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}" for n, r in runs.items()))
    print(f"\n{table(figures)}\n\n{header}" + ("\n(--quick: small policies, not the targets' figures)"
                                                if args.quick else ""))
    document = {"environment": env, "quick": args.quick, "large": args.large, "runs": runs,
                "figures": [{**vars(f), "ratio": f.ratio} for f in figures], "markdown": markdown(figures)}
    args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
    missed = [f for f in figures if f.met is False]
    # bench_delta.py exits 1 when one of its targets is missed; the table says which.
    failed = [n for n, r in runs.items() if r["exit"] not in (0, 1) or "details" not in r]
    print(f"JSON: {args.json}; {len(missed)} target(s) missed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if missed or failed else 0


if __name__ == "__main__":
    sys.exit(main())
