"""What the benchmarks share: seeded policies, namespaces that are always removed, timed
processes, the C load generator, and the figures each benchmark reports.

Every namespace a benchmark creates is named hwbench-*, and nothing here touches the
root namespace's firewall: hostwall runs with --netns, nft through `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SEED = 20261129
COMMAND_TIMEOUT = 300
REPO = Path(__file__).resolve().parents[2]
HOSTWALL = [sys.executable, "-m", "hostwall"]
# First octets of ordinary unicast space: no private, loopback, link-local, CGN,
# documentation or benchmark ranges, so no generated entry ever covers a lab address.
OCTETS = [o for o in range(11, 224) if o not in (100, 127, 169, 172, 192, 198, 203)]
META = "owner: bench\n        reason: benchmark\n        review_by: 2099-01-01"
SERVICES = ("https", "postgres")  # 443 and 5432


# --- figures --------------------------------------------------------------------------------


@dataclass
class Figure:
    """One line of the table: a measurement, what it is compared with, and the target."""

    group: str
    name: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: str = ""  # e.g. "<= 1.5x", ">= 0.95", "<= 50 ms", "== 0"
    met: bool | None = None  # None: reported, no target
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference


def ratio_figure(group: str, name: str, value: float, reference: float, reference_name: str, unit: str,
                 *, at_most: float | None = None, at_least: float | None = None, note: str = "",
                 extra: dict[str, Any] | None = None) -> Figure:
    figure = Figure(group, name, value, unit, reference, reference_name, note=note, extra=extra or {})
    ratio = figure.ratio
    if at_most is not None:
        figure.target, figure.met = f"<= {at_most:g}x", ratio is not None and ratio <= at_most
    elif at_least is not None:
        figure.target, figure.met = f">= {at_least:g}x", ratio is not None and ratio >= at_least
    return figure


def write_figures(path: Path, figures: Sequence[Figure], details: dict[str, Any] | None = None) -> None:
    document = {"environment": environment(), "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
                "details": details or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def read_figures(path: Path) -> list[Figure]:
    document = json.loads(path.read_text())
    return [Figure(**{k: v for k, v in item.items() if k != "ratio"}) for item in document["figures"]]


def environment() -> dict[str, Any]:
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {"kernel": platform.release(), "nft": nft, "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "seed": SEED}


# --- processes --------------------------------------------------------------------------------


def run(command: Sequence[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), input=stdin, capture_output=True, text=True, timeout=timeout,
                            check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:8])} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


@dataclass(frozen=True)
class Timed:
    seconds: float
    max_rss_kb: int  # of the process itself (ru_maxrss of the waited child)
    stdout: str
    # user + system CPU of the process: on a shared machine, waiting for a core inflates
    # wall time but not this (the kernel's work on a netlink batch is the sender's system time).
    cpu_seconds: float = 0.0


PEAK_HELPER = r"""
import json, os, resource, subprocess, sys, time
command = json.loads(sys.argv[1])
started = time.perf_counter()
process = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True)
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
sys.stdout.write(json.dumps({"seconds": seconds, "rc": process.returncode, "peak_kb": usage.ru_maxrss,
                             "cpu": usage.ru_utime + usage.ru_stime,
                             "stdout": process.stdout.decode(), "stderr": process.stderr.decode()[-2000:]}))
"""


def measure_process(command: Sequence[str], timeout: float = COMMAND_TIMEOUT, ok_codes: tuple[int, ...] = (0,)
                    ) -> Timed:
    """Wall time and peak RSS of one command, run by a small helper whose only child it
    is, so that RUSAGE_CHILDREN's peak is this command's. The helper starts before the
    clock does, so its own start-up is not counted."""
    result = run([sys.executable, "-S", "-c", PEAK_HELPER, json.dumps(list(command))], timeout=timeout)
    report = json.loads(result.stdout)
    if report["rc"] not in ok_codes:
        raise RuntimeError(f"{' '.join(command[:8])} exited {report['rc']}: {report['stderr']}")
    return Timed(report["seconds"], report["peak_kb"], report["stdout"], report["cpu"])


def compile_hostwall() -> None:
    """Writes hostwall's bytecode, as an installed package has it (its postinst compiles
    it). Without it, a checkout run under PYTHONDONTWRITEBYTECODE compiles every module
    it imports at every start, about 50 ms that no installed hostwall pays."""
    run([sys.executable, "-m", "compileall", "-q", str(REPO / "hostwall")])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- namespaces -----------------------------------------------------------------------------


def ip(*args: str) -> None:
    run(["ip", *args])


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[tuple[str, ...]]:
    """Network namespaces (each named hwbench-*), deleted however the benchmark ends,
    SIGTERM included."""
    for name in names:
        if not name.startswith("hwbench"):
            raise ValueError(f"a benchmark namespace is named hwbench-*, not {name}")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    created: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        yield names
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=60, check=False)
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Link:
    server: str
    client: str
    server_ipv4: str
    client_ipv4: str


def link(server: str, client: str, index: int) -> Link:
    """A veth pair between two benchmark namespaces, 10.99.index.0/24."""
    outside = f"hwb{index}"
    ip("-n", server, "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", client)
    result = Link(server, client, f"10.99.{index}.1", f"10.99.{index}.2")
    ip("-n", server, "addr", "add", f"{result.server_ipv4}/24", "dev", outside)
    ip("-n", client, "addr", "add", f"{result.client_ipv4}/24", "dev", "eth0")
    ip("-n", server, "link", "set", outside, "up")
    ip("-n", client, "link", "set", "eth0", "up")
    return result


def in_netns(name: str, *command: str) -> list[str]:
    return ["ip", "netns", "exec", name, *command]


def root_tables() -> str:
    # Read-only: compared before and after, to show that the root namespace was not touched.
    return run(["nft", "list", "tables"]).stdout


@contextlib.contextmanager
def workdir(label: str, base: Path = Path("/var/tmp")) -> Iterator[Path]:
    """A real disk, so that hostwall's fsyncs cost what they cost; removed at the end."""
    path = base / f"hwbench-{label}-{os.getpid()}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def hostwall(netns_name: str, policy_dir: Path, state_dir: Path, *args: str) -> list[str]:
    return [*HOSTWALL, "--netns", netns_name, "--policy-dir", str(policy_dir), "--state-dir", str(state_dir),
            *args]


# --- the C load generator ----------------------------------------------------------------------


def build_loadgen(directory: Path) -> Path:
    """tests/bench/loadgen.c compiled for this run: connection and packet loops at C speed,
    so that the generator's own cost does not hide the firewall's."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("the packet benchmarks need a C compiler: apt-get install gcc")
    binary = directory / "loadgen"
    run([compiler, "-O2", "-Wall", "-o", str(binary), str(Path(__file__).with_name("loadgen.c"))])
    return binary


# --- seeded policies ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    cidr: str
    service: str


def generate_entries(n: int, *, overlap: float = 0.0, seed: int = SEED) -> list[Entry]:
    """n IPv4 prefixes and n/4 IPv6 prefixes, alternately for https and postgres.

    IPv4: one entry per random /22 (70% a /32, the rest a /24, /26 or /28), never at the
    block's edges, so that no two entries overlap or touch (the compiler would merge
    neighbours). IPv6: one per random /47, the /48 or a /64 or /128 inside it. With
    overlap, that share of the entries are drawn inside (or equal to) an earlier entry
    of the same service instead, as long lists that grew by hand have.
    """
    rng = random.Random(seed)
    entries: list[Entry] = []
    for family, count in ((4, n), (6, n // 4)):
        distinct = count - int(count * overlap)
        blocks: set[int] = set()
        cidrs: list[str] = []
        for _ in range(distinct * 20):  # bounded: far more tries than needed
            if len(cidrs) == distinct:
                break
            block = _random_block(rng, family)
            if block in blocks:
                continue
            blocks.add(block)
            cidrs.append(_inside_block(rng, family, block))
        if len(cidrs) != distinct:
            raise RuntimeError("could not generate the entries")
        family_entries = [Entry(cidr, SERVICES[index % 2]) for index, cidr in enumerate(cidrs)]
        for _ in range(count - distinct):
            base = rng.choice(family_entries[:distinct])
            family_entries.append(Entry(_within(rng, base.cidr), base.service))
        entries += family_entries
    rng.shuffle(entries)
    return entries


def _random_block(rng: random.Random, family: int) -> int:
    if family == 4:
        return (rng.choice(OCTETS) << 24) | (rng.randrange(1 << 14) << 10)
    return (0x2A00 << 112) | (rng.getrandbits(31) << 81)


def _inside_block(rng: random.Random, family: int, block: int) -> str:
    if family == 4:
        roll = rng.random()
        if roll < 0.7:
            return f"{ipaddress.IPv4Address(block | rng.randrange(1, 1023))}/32"
        if roll < 0.85:
            return f"{ipaddress.IPv4Address(block | (rng.randrange(1, 3) << 8))}/24"
        if roll < 0.95:
            return f"{ipaddress.IPv4Address(block | (rng.randrange(4, 12) << 6))}/26"
        return f"{ipaddress.IPv4Address(block | (rng.randrange(16, 48) << 4))}/28"
    roll = rng.random()
    if roll < 0.4:
        return f"{ipaddress.IPv6Address(block)}/48"
    if roll < 0.7:
        return f"{ipaddress.IPv6Address(block | (rng.randrange(1, 1 << 16) << 64))}/64"
    return f"{ipaddress.IPv6Address(block | rng.getrandbits(64) | 1)}/128"


def _within(rng: random.Random, cidr: str) -> str:
    """A prefix inside cidr (cidr itself for a single address)."""
    network = ipaddress.ip_network(cidr)
    if network.prefixlen == network.max_prefixlen:
        return cidr
    longer = rng.randrange(network.prefixlen, network.max_prefixlen + 1)
    subnets = 1 << (longer - network.prefixlen)
    offset = rng.randrange(subnets) << (network.max_prefixlen - longer)
    return f"{ipaddress.ip_address(int(network.network_address) + offset)}/{longer}"


def write_policy(directory: Path, entries: Sequence[Entry], *, lists: bool,
                 extra: dict[str, Sequence[str]] | None = None,
                 settings: dict[str, int] | None = None) -> None:
    """The entries as a policy directory: as `file:` lists (one per service) or inline,
    each entry with its owner, reason and review date. extra: inline CIDRs per service
    (the lab's allowed client)."""
    directory.mkdir(parents=True, exist_ok=True)
    parts = []
    if settings:
        parts.append("settings:\n" + "".join(f"  {key}: {value}\n" for key, value in settings.items()))
    parts.append("services:\n")
    for service in SERVICES:
        cidrs = [e.cidr for e in entries if e.service == service]
        parts.append(f"  {service}:\n    allow:\n")
        for cidr in (extra or {}).get(service, ()):
            parts.append(f"      - cidr: {cidr}\n        {META}\n")
        if lists:
            (directory / f"{service}.txt").write_text(f"# {len(cidrs)} generated entries\n" + "\n".join(cidrs) + "\n")
            parts.append(f"      - file: {service}.txt\n        {META}\n")
        else:
            parts.extend(f"      - cidr: {cidr}\n        {META}\n" for cidr in cidrs)
    (directory / "bench.yaml").write_text("".join(parts))


def recorded_transaction(state_dir: Path, generation: int | None = None) -> str:
    """The text of the full load hostwall made of a generation (default: the current one),
    without the clearing commands the backend puts in front of it."""
    from hostwall.state import StateDir

    state = StateDir(state_dir)
    if generation is None:
        current = state.current()
        if current is None:
            raise RuntimeError(f"{state_dir} records no generation")
        generation = current.generation
    recorded = state.generation(generation)
    if recorded.has_transaction:
        return recorded.transaction()
    # Built from the ruleset as netlink messages (hostwall.nftload): the text whose load
    # sends the same messages, as the namespace tests check byte for byte.
    from hostwall.ruleset import render_full_load

    return render_full_load(recorded.ruleset(), generation, recorded.meta.created)


def clearing_for(netns_name: str) -> str:
    """The clearing commands hostwall's backend would put in front of a full load now
    (render_clearing of what the namespace's table holds), so that a limit measured
    with nft -f replaces the table in place exactly as hostwall does."""
    from hostwall.nftnl import NetlinkTable
    from hostwall.ruleset import TableObjects, render_clearing

    table = NetlinkTable(netns_name)
    try:
        snapshot = table.snapshot()
    finally:
        table.close()
    return render_clearing(snapshot.objects if snapshot is not None else TableObjects())


PROFILE_REPORT = r"""
import json, pstats, sys
stats = pstats.Stats(sys.argv[1])
rows = []
for (filename, line, function), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
    where = filename.rsplit("site-packages/", 1)[-1].rsplit("/work/", 1)[-1]
    rows.append({"function": f"{where}:{line}({function})", "calls": calls, "tottime": tottime, "cumtime": cumtime})
top_self = sorted(rows, key=lambda r: -r["tottime"])[:12]
phases = sorted((r for r in rows if "hostwall/" in r["function"] and r["cumtime"] >= 0.03),
                key=lambda r: -r["cumtime"])[:25]
print(json.dumps({"total": max(r["cumtime"] for r in rows), "self": top_self, "cumulative": phases}))
"""


# `python -m cProfile -m hostwall` would write nothing: the command ends with os._exit,
# past cProfile's own dump. This runs the same click command and dumps when it is done.
PROFILE_DRIVER = r"""
import cProfile, sys
from hostwall.cli import main
profiler = cProfile.Profile()
profiler.enable()
try:
    main(args=sys.argv[2:], prog_name="hostwall")
except SystemExit as ending:
    if ending.code not in (None, 0):
        raise
finally:
    profiler.disable()
    profiler.dump_stats(sys.argv[1])
"""


def profile(command_args: Sequence[str], output: Path) -> dict[str, Any]:
    """One run of the hostwall command with ARGS under cProfile: the functions with the
    most time of their own, and hostwall's functions by cumulative time (its phases)."""
    run([sys.executable, "-c", PROFILE_DRIVER, str(output), *command_args])
    report: dict[str, Any] = json.loads(run([sys.executable, "-c", PROFILE_REPORT, str(output)]).stdout)
    return report


def profile_report(output: Path, run_profiled: Callable[[Path], object]) -> dict[str, Any]:
    """The same report for a process that run_profiled(output) runs under cProfile."""
    run_profiled(output)
    report: dict[str, Any] = json.loads(run([sys.executable, "-c", PROFILE_REPORT, str(output)]).stdout)
    return report


def format_profile(report: dict[str, Any], lines: int = 8) -> str:
    rows = [f"    {r['cumtime']:6.3f} s cum {r['tottime']:6.3f} s self  {r['function']}"
            for r in report["cumulative"][:lines]]
    rows += [f"    {r['tottime']:6.3f} s self ({r['calls']} calls)  {r['function']}" for r in report["self"][:lines]]
    return f"  profile, {report['total']:.2f} s under cProfile; hostwall by cumulative time, then by own time:\n" + \
        "\n".join(rows)
