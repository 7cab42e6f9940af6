"""Benchmark: the packet path. TCP connections per second from an allowed client
namespace to a listener on 443 in a server namespace, with hostwall's 100k policy
loaded, against no firewall at all, a one-rule-per-address ruleset (what ufw-style
tools produce) and hostwall's earlier set layout.

    sudo .venv/bin/python tests/bench/bench_packet.py [--entries N] [--rounds R] [--seconds S]
        [--pairs P] [--pair-seconds S] [--floor] [--json PATH]

Each connection is SYN, SYN/ACK, ACK, RST (the client closes with a reset, so that no
port waits in TIME_WAIT): three packets to 443 cross the server's prerouting hook.
The load comes from tests/bench/loadgen.c (two processes, one per core), the listener
is the same program accepting and closing. The conditions run in turns, R rounds in
rotated order, and each figure is the median of its rounds.

Conditions (all in the server namespace, loaded with nft -f after `flush ruleset`):
  none      no ruleset at all
  hostwall  the transaction text `hostwall apply` recorded for the policy: N IPv4 and
            N/4 IPv6 prefixes from `file:` lists, the client among the https entries
            (single addresses in hash sets, ranges in interval sets, the allowlist
            before the fib rule)
  interval  the same in hostwall's earlier layout: one interval set per family and the
            fib rule first; measured so that the choice is made on numbers
  rules     hostwall's text with every set empty but for the client: what the chain
            costs apart from the size of the sets
  nofib     hostwall's text without the `fib daddr type != local return` rule
  nocounter hostwall's text without the named counter on the accept rules
  empty     hostwall's table with its base chain and no rule at all: what any nftables
            ruleset on the hook costs before its first rule, the floor under the others
  linear    10k rules `ip saddr X accept` (iptables-nft makes the same expressions),
            the client's rule last, stateless like hostwall's chain: every packet
            walks them, as a one-rule-per-address tool without a conntrack shortcut does

The target is decided by pairs, not by the rotation. The machine's speed drifts by 10%
and more over seconds, far more than a firewall's cost of a few hundred nanoseconds a
packet, and a rotation of 4 s windows compares conditions measured up to half a minute
apart. So hostwall's table, once loaded, is also measured against itself made dormant:
the kernel unregisters a dormant table's hooks, so its packets take exactly the path of
no firewall, and switching takes one small transaction instead of a reload. P pairs of
short windows, in alternating order (dormant first, then active first), and the figure
is the median of the pairs' ratios. The first and the last pair check the table's
accept counter: it must not move while dormant and must move while active. With
--floor, each pair has a third window in which only an empty base chain on hostwall's
hook (a table of its own) is active: the floor under any nftables ruleset there.

Only namespaces named hwbench-* are created, and deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Figure,
    build_loadgen,
    generate_entries,
    hostwall,
    in_netns,
    link,
    median,
    namespaces,
    ratio_figure,
    recorded_transaction,
    root_tables,
    run,
    workdir,
    write_figures,
    write_policy,
)

from hostwall.ruleset import INGRESS_CHAIN, INGRESS_PRIORITY, TABLE_NAME

LINEAR_RULES = 10_000
HTTPS_ACCEPTED = "https_accepted"
PORT = 443
# hostwall's table and base chain on its hook and priority, with nothing in the chain.
EMPTY_CHAIN = (f"table inet {TABLE_NAME} {{\n\tchain {INGRESS_CHAIN} {{\n"
               f"\t\ttype filter hook prerouting priority {INGRESS_PRIORITY}; policy accept;\n\t}}\n}}\n")
# The same beside hostwall's table, for the pairs' floor windows.
FLOOR_TABLE = "hwbench_floor"
FLOOR_CHAIN = EMPTY_CHAIN.replace(f"table inet {TABLE_NAME} ", f"table inet {FLOOR_TABLE} ")
# A connection that fails although the client is allowed is the load's (a full accept
# queue, a SYN retransmitted past the client's 1 s timeout), one in a hundred thousand
# or so; a firewall that drops the client fails every one.
TOLERATED_FAILURES = 1e-4


def linear_ruleset(entries: list[str], client: str) -> str:
    """One accept rule per address, in front of a drop, as ufw-style tools load them."""
    lines = ["table inet linear {", "\tchain ingress {",
             "\t\ttype filter hook prerouting priority -300; policy accept;",
             '\t\tiif "lo" accept', f"\t\ttcp dport {PORT} jump allow", "\t}", "\tchain allow {"]
    lines += [f"\t\tip saddr {cidr} accept" for cidr in entries]
    lines += [f"\t\tip saddr {client} accept", "\t\tdrop", "\t}", "}"]
    return "\n".join(lines) + "\n"


_HOSTS_BLOCK = re.compile(r"\tset (?P<name>\w+)_hosts \{\n(?:\t\t(?!elements)[^\n]*\n)*"
                          r"(?:\t\telements = \{ (?P<elements>[^}]*) \}\n)?\t\}\n")
_SET_END = "\t}\n"


def one_interval_set(text: str) -> str:
    """hostwall's text in its earlier layout: each family's single addresses back in the
    interval set, no hash sets, and the fib rule in front of the allowlist."""
    hosts: dict[str, str] = {}

    def drop_hosts(match: re.Match[str]) -> str:
        if match["elements"]:
            items = (item.split(" ", 1) for item in match["elements"].split(", "))
            hosts[match["name"]] = ", ".join(" ".join([f"{item[0]}/{128 if ':' in item[0] else 32}", *item[1:]])
                                             for item in items)
        return ""

    result = _HOSTS_BLOCK.sub(drop_hosts, text)
    if result == text:
        raise RuntimeError("no hash set of single addresses in hostwall's text")
    for name, elements in hosts.items():
        head = f"\tset {name} {{\n"
        start = result.index(head)
        end = result.index(_SET_END, start)
        body = result[start:end]
        if "\t\telements = { " in body:
            body = body.replace(" }\n", f", {elements} }}\n")
        else:
            body += f"\t\telements = {{ {elements} }}\n"
        result = result[:start] + body + result[end:]
    result = re.sub(r"\t\tip6? saddr @\w+_hosts [^\n]*\n", "", result)
    return re.sub(r"((?:\t\tip6? saddr @\w+ counter name \"\w+\" accept\n)+)(\t\tfib daddr type != local return\n)",
                  lambda m: m[2] + m[1], result)


_ELEMENTS = re.compile(r"\t\telements = \{ [^}]* \}\n")


def rules_only(text: str, client: str) -> str:
    """hostwall's text with its address sets emptied (the generation marker kept) and
    the client added back to https_v4."""
    emptied = _ELEMENTS.sub(lambda m: m[0] if "generation=" in text[max(0, m.start() - 200):m.start()] else "", text)
    return emptied + f"add element inet hostwall https_v4_hosts {{ {client} }}\n"


def without_fib(text: str) -> str:
    result = text.replace("\t\tfib daddr type != local return\n", "")
    if result == text:
        raise RuntimeError("no fib rule found in hostwall's text")
    return result


def without_accept_counter(text: str) -> str:
    result = re.sub(r"(\t\tip6? saddr @\w+) counter name \"\w+\" accept", r"\1 accept", text)
    if result == text:
        raise RuntimeError("no counted accept rule in hostwall's text")
    return result


def accepted_packets(server: str, counter: str) -> int:
    output = run(in_netns(server, "nft", "list", "counter", "inet", TABLE_NAME, counter)).stdout
    found = re.search(r"packets (\d+)", output)
    if found is None:
        raise RuntimeError(f"no packet count in nft's listing of counter {counter}")
    return int(found[1])


def set_dormant(server: str, table: str, dormant: bool) -> None:
    # `add table` without flags clears them: the table's hooks are registered again.
    run(in_netns(server, "nft", "add", "table", "inet", table, *(["{ flags dormant; }"] if dormant else [])))


def paired(loadgen: Path, server: str, client: str, server_ip: str, counter: str,
           pairs: int, seconds: float, processes: int, floor: bool) -> list[dict[str, float]]:
    """Connection rates of hostwall's loaded table, pair by pair: "dormant" (no table's
    hook registered), "active" (hostwall's), and with floor, "floor" (only the empty
    base chain of FLOOR_TABLE's)."""
    states = ["dormant", "active", *(["floor"] if floor else [])]
    results: list[dict[str, float]] = []
    for index in range(pairs):
        rates: dict[str, float] = {}
        # nft reads the whole table to list one counter (0.7 s at 100k), so the first
        # and the last pair check that the switch works.
        checked = index in (0, pairs - 1)
        for state in states[index % len(states):] + states[:index % len(states)]:
            set_dormant(server, TABLE_NAME, state != "active")
            if floor:
                set_dormant(server, FLOOR_TABLE, state != "floor")
            before = accepted_packets(server, counter) if checked else 0
            rate, failures = measure(loadgen, client, server_ip, seconds, processes)
            counted = accepted_packets(server, counter) - before if checked else None
            if state != "active" and counted:
                raise RuntimeError(f"the dormant table counted {counted} packets: its hooks are still registered")
            if state == "active" and counted is not None and counted < rate * seconds:
                raise RuntimeError(f"the active table counted {counted} packets for {rate * seconds:.0f} connections")
            if failures > TOLERATED_FAILURES * rate * seconds:
                raise RuntimeError(f"{failures} connections failed (the client must be allowed)")
            rates[state] = rate
        results.append(rates)
        print(f"  pair {index + 1} " + "  ".join(f"{state} {rates[state]:>8.0f}" for state in states)
              + "  " + " ".join(f"{rates[state] / rates['dormant']:.3f}" for state in states[1:]), flush=True)
    set_dormant(server, TABLE_NAME, False)
    return results


def measure(loadgen: Path, client_ns: str, server_ip: str, seconds: float, processes: int) -> tuple[float, int]:
    output = run(in_netns(client_ns, str(loadgen), "connect", server_ip, str(PORT), str(seconds),
                          str(5_000_000), str(processes)), timeout=seconds + 30).stdout.split()
    connections, failures, elapsed = int(output[0]), int(output[1]), float(output[2])
    return connections / elapsed, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000, help="IPv4 entries of the policy (default: 100k)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="per condition and round")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, default=Path("/tmp/hostwall-bench-packet.json"))
    parser.add_argument("--conditions", default="", help="only these conditions (comma-separated) besides none")
    parser.add_argument("--pairs", type=int, default=30, help="dormant/active pairs of hostwall's table (0: none)")
    parser.add_argument("--pair-seconds", type=float, default=1.0, help="per window of a pair")
    parser.add_argument("--floor", action="store_true",
                        help="add to each pair a window with only an empty base chain on the hook")
    args = parser.parse_args()
    if not (1 <= args.rounds <= 20 and 0.5 <= args.seconds <= 30 and 1 <= args.processes <= 16
            and (args.pairs == 0 or 2 <= args.pairs <= 200) and 0.2 <= args.pair_seconds <= 10):
        parser.error("--rounds 1-20, --seconds 0.5-30, --processes 1-16, --pairs 0 or 2-200, --pair-seconds 0.2-10")
    before = root_tables()
    pid = os.getpid()
    with workdir("packet") as work, namespaces(f"hwbench-{pid}-srv", f"hwbench-{pid}-cli") as (server, client):
        lab = link(server, client, 1)
        loadgen = build_loadgen(work)
        entries = generate_entries(args.entries)
        write_policy(work / "policy", entries, lists=True, extra={"https": [f"{lab.client_ipv4}/32"]})
        run(hostwall(server, work / "policy", work / "state", "apply", "-m", "bench"))
        texts = {"none": "", "hostwall": recorded_transaction(work / "state")}
        texts["interval"] = one_interval_set(texts["hostwall"])
        texts["rules"] = rules_only(texts["hostwall"], lab.client_ipv4)
        texts["nofib"] = without_fib(texts["hostwall"])
        texts["nocounter"] = without_accept_counter(texts["hostwall"])
        texts["empty"] = EMPTY_CHAIN
        ipv4 = [e.cidr for e in entries if ":" not in e.cidr]
        texts["linear"] = linear_ruleset(ipv4[:LINEAR_RULES], lab.client_ipv4)
        if args.conditions:
            texts = {name: text for name, text in texts.items() if name in {"none", *args.conditions.split(",")}}
        for name, text in texts.items():
            (work / f"{name}.nft").write_text(text)
        (work / "paired.nft").write_text(recorded_transaction(work / "state"))
        budget = (args.seconds + 5) * len(texts) * args.rounds + (args.pair_seconds + 2) * 3 * args.pairs + 60
        listener = subprocess.Popen(in_netns(server, str(loadgen), "server", str(PORT), str(budget)),
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "listening":
                raise RuntimeError("the listener did not start")
            rates: dict[str, list[float]] = {name: [] for name in texts}
            names = list(texts)
            for round_ in range(args.rounds):
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    run(in_netns(server, "nft", "flush", "ruleset"))
                    if texts[name]:
                        run(in_netns(server, "nft", "-f", str(work / f"{name}.nft")))
                    rate, failures = measure(loadgen, client, lab.server_ipv4, args.seconds, args.processes)
                    if failures > TOLERATED_FAILURES * rate * args.seconds:
                        raise RuntimeError(f"{name}: {failures} connections failed (the client must be allowed)")
                    rates[name].append(rate)
                    print(f"  round {round_ + 1} {name:<9} {rate:>10.0f} connections/s", flush=True)
            pairs: list[dict[str, float]] = []
            if args.pairs:
                run(in_netns(server, "nft", "flush", "ruleset"))
                run(in_netns(server, "nft", "-f", str(work / "paired.nft")))
                if args.floor:
                    (work / "floor.nft").write_text(FLOOR_CHAIN)
                    run(in_netns(server, "nft", "-f", str(work / "floor.nft")))
                pairs = paired(loadgen, server, client, lab.server_ipv4, HTTPS_ACCEPTED, args.pairs,
                               args.pair_seconds, args.processes, args.floor)
        finally:
            listener.kill()  # by its PID (the Popen object); it ends by itself at its deadline too
            listener.wait(timeout=30)
    if root_tables() != before:
        print("warning: the root namespace's tables changed during the run (another process?)", file=sys.stderr)
    none = median(rates["none"])
    size = f"{args.entries // 1000}k"
    # condition -> (figure name, target, note); the target is the pairs', below.
    described: dict[str, tuple[str, float | None, str]] = {
        "hostwall": (f"hostwall {size} policy loaded, in the rotation", None,
                     "single addresses in a hash set, ranges in an interval set, allowlist before fib"),
        "interval": (f"one interval set per family {size}, fib first", None,
                     "hostwall's earlier layout; measured for the choice"),
        "rules": ("hostwall's chain with 1-element sets", None, "the chain's cost apart from the sets' size"),
        "nofib": (f"hostwall {size} without the fib rule", None, "not hostwall's ruleset; the route lookup's share"),
        "nocounter": (f"hostwall {size} without the accept counter", None, "the named counter's share"),
        "empty": ("an empty base chain on the same hook", None, "the hook's own cost: the floor"),
        "linear": (f"{LINEAR_RULES // 1000}k one-rule-per-address rules", None,
                   "ufw-style, stateless, client's rule last"),
    }
    figures: list[Figure] = [
        Figure("4 packet path", "TCP connections/s, no firewall", none, "conn/s",
               note=f"{args.processes} client processes, {args.seconds:g} s x {args.rounds} rounds"),
        *(ratio_figure("4 packet path", name, median(rates[condition]), none, "no firewall", "conn/s",
                       at_least=target, note=note)
          for condition, (name, target, note) in described.items() if condition in rates),
    ]
    if pairs:
        ratios = [pair["active"] / pair["dormant"] for pair in pairs]
        pair_ratio = median(ratios)
        quartiles = statistics.quantiles(ratios, n=4)
        figures.append(Figure(
            "4 packet path", f"hostwall {size} policy loaded, against its table dormant",
            median([pair["active"] for pair in pairs]), "conn/s", median([pair["dormant"] for pair in pairs]),
            "the same table dormant (no hook)", target=">= 0.97x", met=pair_ratio >= 0.97,
            note=f"median of {len(pairs)} pairs' ratios {pair_ratio:.3f} (decides; quartiles "
                 f"{quartiles[0]:.3f}-{quartiles[2]:.3f}), {args.pair_seconds:g} s windows",
            extra={"pair_ratio": pair_ratio}))
        if args.floor:
            floor_ratios = [pair["floor"] / pair["dormant"] for pair in pairs]
            quartiles = statistics.quantiles(floor_ratios, n=4)
            figures.append(Figure(
                "4 packet path", "an empty base chain on the same hook, in the same pairs",
                median([pair["floor"] for pair in pairs]), "conn/s", median([pair["dormant"] for pair in pairs]),
                "no hook", note=f"median of the pairs' ratios {median(floor_ratios):.3f} (quartiles "
                f"{quartiles[0]:.3f}-{quartiles[2]:.3f}): the floor", extra={"pair_ratio": median(floor_ratios)}))
    write_figures(args.json, figures, {"rates": rates, "pairs": pairs})
    for figure in figures:
        ratio = f"{figure.ratio:.3f}" if figure.ratio is not None else ""
        print(f"{figure.name:<48}{figure.value:>10.0f} {figure.unit:<7}{ratio:>7}  {figure.target} {figure.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
