"""Commands around the journal: the agent that writes drop records, and drops that reads them."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
from msgspec import Struct

from hostwall import clock
from hostwall.cli.common import (
    Options,
    emit_json,
    json_option,
    pass_options,
    reports_errors,
    require_privileges,
)
from hostwall.errors import HostwallError

if TYPE_CHECKING:
    from collections.abc import Callable

    from hostwall.journal import JournalEntry
    from hostwall.policy import Policy
    from hostwall.verify.report import Report


class DropsView(Struct, frozen=True):
    entries: tuple[JournalEntry, ...]
    error: str | None = None


def last_drops(netns: str | None, count: int = 5, since_seconds: float = 86400) -> DropsView:
    from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY
    from hostwall.journal import read_last

    matches = {"HOSTWALL_NETNS": netns} if netns else {}
    try:
        entries = read_last(message_ids=(MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY), matches=matches, count=count,
                            since=clock.now() - since_seconds)
    except HostwallError as error:
        return DropsView((), str(error))
    return DropsView(tuple(entries))


def _log_group(options: Options) -> int:
    """The group the loaded ruleset logs to: the recorded generation's, else the policy's."""
    state = options.state()
    current = state.current()
    if current is not None:
        try:
            return state.generation(current.generation).ruleset().log_group
        except HostwallError:
            pass
    try:
        return options.policy().settings.log_group
    except HostwallError:
        from hostwall.policy import Settings

        return Settings().log_group


def _boot_time() -> float:
    # From the clocks, not /proc/stat: the unit's ProcSubset=pid hides /proc/stat.
    return clock.now() - time.clock_gettime(time.CLOCK_BOOTTIME)


@click.command(epilog="Example: sudo hostwall agent --metrics-file /var/lib/node_exporter/hostwall.prom")
@click.option("--log-group", envvar="HOSTWALL_LOG_GROUP", show_envvar=True,
              type=click.IntRange(0, 65535), default=None,
              help="NFLOG group to read (default: the loaded ruleset's).")
@click.option("--flood-window", envvar="HOSTWALL_FLOOD_WINDOW", show_envvar=True,
              type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Seconds per flood-control window.")
@click.option("--flood-records", envvar="HOSTWALL_FLOOD_RECORDS", show_envvar=True,
              type=click.IntRange(min=1), default=5, show_default=True,
              help="Records per source and window before it is summarised.")
@click.option("--recon-per-minute", envvar="HOSTWALL_RECON_PER_MINUTE", show_envvar=True,
              type=click.IntRange(min=1), default=60, show_default=True,
              help="Drops per minute from one source that raise a reconnaissance warning.")
@click.option("--nflog-buffer", envvar="HOSTWALL_NFLOG_BUFFER", show_envvar=True,
              type=click.IntRange(min=1024), default=16 << 20, show_default=True,
              help="Receive buffer for drop logs, in bytes.")
@click.option("--nflog-queue-threshold", envvar="HOSTWALL_NFLOG_QUEUE_THRESHOLD", show_envvar=True,
              type=click.IntRange(min=1), default=64, show_default=True,
              help="Drop logs the kernel batches into one message.")
@click.option("--full-check-interval", envvar="HOSTWALL_FULL_CHECK_INTERVAL", show_envvar=True,
              type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds between full comparisons of the kernel's sets with the record.")
@click.option("--metrics-file", envvar="HOSTWALL_METRICS_FILE", show_envvar=True,
              type=click.Path(path_type=Path), default=None,
              help="Write Prometheus metrics here (node_exporter textfile collector).")
@click.option("--metrics-interval", envvar="HOSTWALL_METRICS_INTERVAL", show_envvar=True,
              type=click.FloatRange(min=1), default=15.0, show_default=True, help="Seconds between metrics writes.")
@click.option("--test-stall-watchdog-after", type=float, default=None, hidden=True)
@click.option("--verify-after-reload", is_flag=True,
              help="After each reload, run `hostwall verify`; a difference is a journal warning.")
@pass_options
@reports_errors
def agent(options: Options, log_group: int | None, flood_window: float, flood_records: int,
          recon_per_minute: int, nflog_buffer: int, nflog_queue_threshold: int, full_check_interval: float,
          metrics_file: Path | None, metrics_interval: float, test_stall_watchdog_after: float | None,
          verify_after_reload: bool) -> None:
    """Run the agent in the foreground (systemd Type=notify service).

    Every option can also be set in the environment (HOSTWALL_FLOOD_WINDOW and so on);
    hostwall.service reads them from /etc/default/hostwall.

    On start it loads the policy (or keeps the last generation when the policy is
    invalid; with neither, it closes the protected ports to all but loopback), then
    reports READY. SIGHUP reloads the policy. It rolls back unconfirmed changes at
    their deadline, and any left unconfirmed from before a reboot. It restores its
    table when something changes it, and streams drop logs into journald. SIGTERM
    stops it and leaves the firewall in place.
    """
    require_privileges("agent")
    import signal

    from hostwall.agent import Agent, AgentSettings, DropStreamer, InterfaceNames
    from hostwall.drops import MESSAGE_ID_AGENT, PRIORITY_INFO, DropReporter, FloodControl, Record
    from hostwall.engine import Engine
    from hostwall.journal import JournalSink
    from hostwall.nfevents import RulesetEvents
    from hostwall.nflog import NflogReader, NflogSettings
    from hostwall.nft import NftBackend
    from hostwall.notify import Notifier

    state = options.state()
    backend = NftBackend(options.netns)
    # The agent enforces confirmation deadlines itself; no detached reverter is needed.
    engine = Engine(backend, state)
    sink = JournalSink({"HOSTWALL_NETNS": options.netns} if options.netns else None)
    group = log_group if log_group is not None else _log_group(options)
    reader = NflogReader(NflogSettings(group=group, receive_buffer=nflog_buffer,
                                       queue_threshold=nflog_queue_threshold), options.netns)

    def generation() -> int | None:
        try:
            current = state.current()
        except HostwallError:
            return None
        return current.generation if current else None

    streamer = DropStreamer(reader, sink, DropReporter(
        FloodControl(flood_window, flood_records, recon_per_minute), time.monotonic),
        InterfaceNames(options.netns), generation)
    service = Agent(
        engine, state, lambda: options.policy(write_cache=True), Notifier(), sink, streamer=streamer,
        events=RulesetEvents(options.netns), counters=backend.counters,
        settings=AgentSettings(full_check_interval, metrics_file, metrics_interval, test_stall_watchdog_after),
        boot_time=_boot_time(),
        verify=reload_verifier(options) if verify_after_reload else None,
    )
    requests = {"reload": False, "stop": False}

    def on_signal(signum: int, _frame: object) -> None:
        requests["reload" if signum == signal.SIGHUP else "stop"] = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    sink.send(Record(f"agent starting: drop logs from NFLOG group {group}", MESSAGE_ID_AGENT, PRIORITY_INFO,
                     {"HOSTWALL_LOG_GROUP": str(group)}))
    service.start()
    try:
        while not requests["stop"]:
            if requests["reload"]:
                requests["reload"] = False
                service.reload()
            service.tick()
    finally:
        service.stop()
        reader.close()
        stats = streamer.stats
        sink.send(Record(f"agent stopped: {stats.packets} drops read, {stats.records} records, "
                         f"{stats.lost} lost; the firewall stays in place",
                         MESSAGE_ID_AGENT, PRIORITY_INFO,
                         {"HOSTWALL_LOST_TOTAL": str(stats.lost), "HOSTWALL_DROPS_READ": str(stats.packets)}))


def parse_since(text: str, now: float | None = None) -> float:
    """'10m', '2h', '1d', '30s' ago, or an ISO 8601 timestamp."""
    now = clock.now() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    relative = re.fullmatch(r"([0-9]{1,9})([smhd])", text)
    if relative:
        return now - int(relative[1]) * units[relative[2]]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use e.g. 10m, 2h, 1d or 2026-11-28T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@click.command(epilog="Example: hostwall drops --since 1h --service postgres --top 10")
@click.option("--service", help="Only this service.")
@click.option("--source", "source_address", metavar="ADDRESS", help="Only this source address.")
@click.option("--since", "since_text", metavar="WHEN", help="e.g. 10m, 2h, 1d or an ISO timestamp.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new drops as they come.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Show the N sources with most drops.")
@json_option
@pass_options
@reports_errors
def drops(options: Options, service: str | None, source_address: str | None, since_text: str | None,
          follow: bool, top: int | None, as_json: bool) -> None:
    """Drop records from the journal, filtered; --top N ranks sources."""
    from collections import Counter

    from hostwall.drops import MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY, typed_fields
    from hostwall.journal import read_entries

    matches = {}
    if service:
        matches["HOSTWALL_SERVICE"] = service
    if source_address:
        matches["HOSTWALL_SRC"] = source_address
    if options.netns:
        matches["HOSTWALL_NETNS"] = options.netns
    entries = read_entries(
        message_ids=(MESSAGE_ID_DROP, MESSAGE_ID_DROP_SUMMARY), matches=matches,
        since=parse_since(since_text) if since_text else None, follow=follow and top is None,
    )
    if top is not None:
        totals: Counter[tuple[str, str]] = Counter()
        for entry in entries:
            totals[(entry.fields.get("HOSTWALL_SRC", "?"), entry.fields.get("HOSTWALL_SERVICE", "?"))] += int(
                entry.fields.get("HOSTWALL_COUNT", "1"))
        ranked = totals.most_common(top)
        if as_json:
            emit_json([{"source": s, "service": svc, "drops": n} for (s, svc), n in ranked])
        else:
            options.out.table(["drops", "source", "service"],
                              [[str(count), address, name] for (address, name), count in ranked], right=(0,))
        return
    for entry in entries:
        if as_json:
            click.echo(json.dumps({"time": datetime.fromtimestamp(entry.timestamp, UTC).isoformat(),
                                   "message": entry.message, **typed_fields(entry.fields)}, sort_keys=True))
        else:
            stamp = datetime.fromtimestamp(entry.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")
            options.out.line(f"{stamp}  {entry.message}")


def reload_verifier(options: Options) -> Callable[[Policy], Report]:
    from hostwall.cli.verify import run_verify

    def verify(policy: Policy) -> Report:
        # The agent keeps its own SIGTERM handler: it stops once verify has cleaned up.
        return run_verify(options, policy, own_signals=False)

    return verify
