"""The exported rules: built once from the policy, read by every target's renderer.

Rules are sorted by service, family and address (then owner and reason), not by the
order of files and entries, so that moving an entry between policy files or renaming a
file does not change an exported byte: a deployed copy is compared byte for byte.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from msgspec import Struct

from hostwall.cidr import IPNetwork
from hostwall.errors import ExportError
from hostwall.policy import Entry, Origin, Policy, Service
from hostwall.policyspec import PortRange, Protocol


class ExportedRule(Struct, frozen=True):
    """One allow entry of one service, as every target sees it."""

    network: IPNetwork
    owner: str
    reason: str
    review_by: date
    expires: datetime | None
    origin: Origin

    @property
    def family(self) -> Literal[4, 6]:
        return 4 if self.network.version == 4 else 6

    def sort_key(self) -> tuple[int, int, int, str, str, date, float]:
        expires = self.expires.timestamp() if self.expires is not None else float("inf")
        return (self.family, int(self.network.network_address), self.network.prefixlen, self.owner, self.reason,
                self.review_by, expires)


class ExportedService(Struct, frozen=True):
    name: str
    ports: tuple[PortRange, ...]
    protocols: tuple[Protocol, ...]
    rules: tuple[ExportedRule, ...]

    def networks(self, family: int | None = None) -> list[tuple[IPNetwork, tuple[ExportedRule, ...]]]:
        """Each distinct network once, with every rule that names it: two entries of the
        same CIDR (two owners) are one source range in a cloud rule, which refuses duplicates."""
        grouped: dict[IPNetwork, list[ExportedRule]] = {}
        for rule in self.rules:
            if family is None or rule.family == family:
                grouped.setdefault(rule.network, []).append(rule)
        return [(network, tuple(rules)) for network, rules in grouped.items()]


class ExportModel(Struct, frozen=True):
    services: tuple[ExportedService, ...]
    # Entries left out because their expiry has passed: those of the whole policy found at
    # loading (it does not keep their service), and those of the exported services since.
    expired: int = 0

    def rule_count(self) -> int:
        return sum(len(s.rules) for s in self.services)

    def single(self, target: str) -> ExportedService:
        """The one service of a target that describes one listener (an nginx server block,
        a PostgreSQL server, a Kong service)."""
        if len(self.services) != 1:
            names = ", ".join(s.name for s in self.services) or "none"
            raise ExportError(f"--format {target} writes the rules of one service; the policy has {names}: "
                              "choose one with --service")
        return self.services[0]


class TargetOptions(Struct, frozen=True):
    """What the operator chose for the targets; each renderer reads only its own fields.
    The defaults are the providers' documented default limits."""

    trusted_proxies: tuple[IPNetwork, ...] = ()
    pg_connection: Literal["hostssl", "host"] = "hostssl"
    pg_auth: str = "scram-sha-256"
    pg_database: str = "all"
    pg_user: str = "all"
    aws_group_id: str | None = None
    aws_rules_per_group: int = 60
    name_prefix: str = "hostwall"
    azure_first_priority: int = 100
    azure_rules_per_nsg: int = 1000
    azure_prefixes_per_nsg: int = 4000
    gcp_network: str | None = None
    gcp_priority: int = 1000
    gcp_ranges_per_rule: int = 5000
    kong_service: str | None = None


def build_model(policy: Policy, now: datetime, service: str | None = None) -> ExportModel:
    """The rules of every service (or only of `service`) that have not expired at `now`."""
    services = sorted(policy.services, key=lambda s: s.name)
    if service is not None:
        services = [s for s in services if s.name == service]
        if not services:
            known = ", ".join(s.name for s in sorted(policy.services, key=lambda s: s.name)) or "none"
            raise ExportError(f"the policy has no service {service!r} (services: {known}); choose one with --service")
    expired = len(policy.expired)
    exported = []
    for item in services:
        rules, gone = _rules(item, now)
        expired += gone
        exported.append(ExportedService(item.name, tuple(sorted(item.ports)), tuple(sorted(item.protocols)), rules))
    return ExportModel(tuple(exported), expired)


def _rules(service: Service, now: datetime) -> tuple[tuple[ExportedRule, ...], int]:
    # The policy left out what had expired when it was loaded; a policy loaded earlier
    # (or a long list that took a while) is checked again against this export's clock.
    live: list[Entry] = []
    gone = 0
    for entry in service.entries:
        if entry.expires is not None and entry.expires <= now:
            gone += 1
        else:
            live.append(entry)
    rules = [ExportedRule(entry.network, entry.owner, entry.reason, entry.review_by, entry.expires, entry.origin)
             for entry in live]
    return tuple(sorted(rules, key=ExportedRule.sort_key)), gone

