"""Policy -> Ruleset. Pure and deterministic: same policy, same ruleset, same hash."""

from __future__ import annotations

from hostwall.cidr import merge_intervals
from hostwall.policy import Policy
from hostwall.ruleset import Ruleset, ServiceRules


def compile_policy(policy: Policy) -> Ruleset:
    services = []
    for service in sorted(policy.services, key=lambda s: s.name):
        merged = merge_intervals(e.interval for e in service.entries)
        services.append(ServiceRules(
            name=service.name,
            ports=service.ports,
            protocols=service.protocols,
            action=service.action,
            v4=tuple(i for i in merged if i.family == 4),
            v6=tuple(i for i in merged if i.family == 6),
        ))
    return Ruleset(
        services=tuple(services),
        log_group=policy.settings.log_group,
        log_rate=policy.settings.log_rate,
        log_burst=policy.settings.log_burst,
    )
