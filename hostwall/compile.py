"""Policy -> Ruleset. Pure and deterministic: same policy, same ruleset, same hash."""

from __future__ import annotations

from hostwall.cidr import Interval, IntervalSet
from hostwall.policy import Entries, Policy, Service
from hostwall.ruleset import Ruleset, ServiceRules


def compile_policy(policy: Policy) -> Ruleset:
    services = []
    for service in sorted(policy.services, key=lambda s: s.name):
        services.append(ServiceRules(
            name=service.name,
            ports=service.ports,
            protocols=service.protocols,
            action=service.action,
            entry_counters=service.entry_counters,
            log=service.log,
            v4=_merged(service, 4),
            v6=_merged(service, 6),
        ))
    return Ruleset(
        services=tuple(services),
        log_group=policy.settings.log_group,
        log_rate=policy.settings.log_rate,
        log_burst=policy.settings.log_burst,
        strict_source=policy.settings.strict_source,
    )


def _merged(service: Service, family: int) -> IntervalSet:
    """merge_intervals over the service's entries of one family.

    A ``file:`` list arrives already merged as bytes; the largest one is the base and
    everything else is merged into it, so an unchanged 100k-line list costs a copy of
    its bytes rather than 100k objects.
    """
    entries = service.entries
    if not isinstance(entries, Entries):
        return IntervalSet.merged(family, [e.interval for e in entries if e.interval.family == family])
    lists = sorted((part.intervals(family) for part in entries.lists), key=len, reverse=True)
    extra: list[Interval] = [e.interval for e in entries.inline if e.interval.family == family]
    if not lists:
        return IntervalSet.merged(family, extra)
    for other in lists[1:]:
        extra.extend(other)
    return lists[0].merged_with(extra)
