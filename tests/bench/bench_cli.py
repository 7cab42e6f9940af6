"""Benchmark: command-line start-up. Wall time of `hostwall --help` and of
`hostwall validate policies/partners.yaml`, each a fresh process, as an operator or
Ansible runs them.

    .venv/bin/python tests/bench/bench_cli.py [--repeat R] [--json PATH] [--profile]

Needs no root and touches no namespace: neither command goes near the kernel.
The figure is the median of R runs; the target is under 0.3 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    HOSTWALL,
    REPO,
    Figure,
    compile_hostwall,
    format_profile,
    measure_process,
    median,
    profile,
    write_figures,
)

TARGET = 0.3
COMMANDS = {
    "hostwall --help": ["--help"],
    "hostwall validate policies/partners.yaml": ["validate", str(REPO / "policies" / "partners.yaml")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", type=Path, default=Path("/tmp/hostwall-bench-cli.json"))
    parser.add_argument("--profile", action="store_true", help="profile (cProfile) a command that misses the target")
    args = parser.parse_args()
    if not 1 <= args.repeat <= 100:
        parser.error("--repeat 1-100")
    compile_hostwall()
    figures: list[Figure] = []
    for label, command in COMMANDS.items():
        measure_process([*HOSTWALL, *command])  # warm the page cache and the bytecode
        runs = [measure_process([*HOSTWALL, *command]) for _ in range(args.repeat)]
        seconds, peak_mb = median([r.seconds for r in runs]), int(median([r.max_rss_kb for r in runs])) // 1024
        figure = Figure("6 CLI start-up", label, seconds, "s", target=f"< {TARGET} s", met=seconds < TARGET,
                        note=f"median of {args.repeat}; peak RSS {peak_mb} MB",
                        extra={"runs": [r.seconds for r in runs]})
        if args.profile and not figure.met:
            with tempfile.TemporaryDirectory(prefix="hwbench-cli-") as scratch:
                figure.extra["profile"] = profile(command, Path(scratch) / "cli.prof")
            print(format_profile(figure.extra["profile"]))
        figures.append(figure)
        print(f"{label:<44}{seconds * 1000:>8.0f} ms  {'met' if figure.met else 'missed'}", flush=True)
    write_figures(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
