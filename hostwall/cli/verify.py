"""verify: the loaded ruleset, copied into a throw-away namespace and probed with packets."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType
from typing import TYPE_CHECKING

import click

from hostwall.cli.common import (
    EXIT_NEEDS_ATTENTION,
    EXIT_OK,
    Options,
    emit_json,
    json_option,
    pass_options,
    reports_errors,
    require_privileges,
)

if TYPE_CHECKING:
    from hostwall.policy import Policy
    from hostwall.verify.report import Report

DEFAULT_SAMPLES = 20_000  # hostwall.verify.probes.DEFAULT_SAMPLES, repeated so that --help need not import it
SHOWN = 50


EXIT_TERMINATED = 128 + signal.SIGTERM


@contextmanager
def terminated_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the replica's namespaces are removed on the way
    out; a second SIGTERM is ignored so that it cannot cut that clean-up short."""

    def exit_cleanly(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_verify(options: Options, policy: Policy, samples: int = DEFAULT_SAMPLES, seed: int | None = None, *,
               own_signals: bool = True) -> Report:
    """Probe the ruleset loaded in options.netns against policy's answers. own_signals:
    SIGTERM unwinds it (a command); the agent, which handles SIGTERM itself, passes False."""
    from hostwall.compile import compile_policy
    from hostwall.nft import NftBackend
    from hostwall.verify import replica
    from hostwall.verify.run import verify

    replica.sweep_leftovers()
    backend = NftBackend(options.netns)
    try:
        table = backend.read_table(elements=True)
    finally:
        backend.close()
    listed = dict(table.sets) if table is not None and table.sets is not None else {}

    with terminated_cleanly() if own_signals else nullcontext():
        return verify(policy, dict(compile_policy(policy).sets()), listed, replica.opened_for(options.netns),
                      samples, seed)


def print_report(options: Options, report: Report) -> None:
    from hostwall.verify.report import HEADERS

    out = options.out
    if report.mismatches:
        rows = [m.row() for m in report.mismatches[:SHOWN]]
        out.table(HEADERS, rows, styles=["error"] * len(rows))
        if len(report.mismatches) > SHOWN:
            out.line(f"... and {len(report.mismatches) - SHOWN} more (--json lists all)", style="error")
    if report.unobservable:
        out.line(f"{report.unobservable} probe(s) left out: sources the kernel discards as martians", style="muted")
    out.line(report.summary(), style="ok" if report.agrees else "error")


@click.command("verify", epilog="Example: sudo hostwall verify")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Probe at most this many kernel elements; above it, a sample stratified by service and family.")
@click.option("--seed", type=int, default=None, help="Seed of the sample and the random sources (to repeat a run).")
@json_option
@pass_options
@reports_errors
def verify_command(options: Options, samples: int, seed: int | None, as_json: bool) -> None:
    """Prove with packets that the loaded ruleset does what the policy says; exit 10 on a difference.

    The ruleset is copied into a throw-away namespace (the live one is only read) and
    probed there with TCP SYNs and UDP datagrams from admitted and denied sources.
    """
    require_privileges("verify")
    report = run_verify(options, options.policy(), samples, seed)
    if as_json:
        emit_json(report.to_json())
    else:
        print_report(options, report)
    sys.exit(EXIT_OK if report.agrees else EXIT_NEEDS_ATTENTION)
