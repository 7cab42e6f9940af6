"""Google Cloud: VPC firewall rule resources (the bodies of `firewalls.insert`), as a
JSON list.

A VPC firewall rule holds IPv4 or IPv6 ranges, never both, and at most 5,000 source
ranges (the VPC quota), so each service gets one allow rule per family, split into
more when it has more ranges, and one deny rule per family for every other source at
the next lower priority. Names follow RFC 1035 as the API requires: lowercase letters,
digits and '-', at most 63 characters.
"""

from __future__ import annotations

from typing import Any

from hostwall.errors import ExportError
from hostwall.export.model import ExportedService, ExportModel, TargetOptions
from hostwall.export.text import as_json, printable

DESCRIPTION_LENGTH = 255
NAME_LENGTH = 63
EVERYONE = {4: "0.0.0.0/0", 6: "::/0"}


def render(model: ExportModel, options: TargetOptions) -> str:
    if options.gcp_ranges_per_rule < 1:
        raise ExportError("gcp-firewall: --gcp-ranges-per-rule must be at least 1")
    resources = []
    for service in model.services:
        for family in (4, 6):
            networks = service.networks(family)
            chunks = [networks[i:i + options.gcp_ranges_per_rule]
                      for i in range(0, len(networks), options.gcp_ranges_per_rule)]
            for number, chunk in enumerate(chunks, start=1):
                suffix = f"-{number}" if len(chunks) > 1 else ""
                owners = sorted({rule.owner for _, rules in chunk for rule in rules})
                description = (f"hostwall: {service.name} from {len(chunk)} IPv{family} ranges; owners: "
                               + ", ".join(printable(o) for o in owners))
                resources.append(_rule(options, f"{_name(options, service)}-ipv{family}{suffix}", "allowed",
                                       options.gcp_priority, service, [str(n) for n, _ in chunk], description))
            resources.append(_rule(options, f"{_name(options, service)}-deny-ipv{family}", "denied",
                                   options.gcp_priority + 1, service, [EVERYONE[family]],
                                   f"hostwall: every other IPv{family} source to {service.name}"))
    for resource in resources:
        if len(resource["name"]) > NAME_LENGTH:
            raise ExportError(f"gcp-firewall: rule name {resource['name']!r} is longer than {NAME_LENGTH} characters: "
                              "choose a shorter --name-prefix")
    return as_json(resources)


def _name(options: TargetOptions, service: ExportedService) -> str:
    return f"{options.name_prefix}-{service.name.replace('_', '-')}"


def _rule(options: TargetOptions, name: str, verdict: str, priority: int, service: ExportedService,
          ranges: list[str], description: str) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": name,
        "description": description if len(description) <= DESCRIPTION_LENGTH else
        description[: DESCRIPTION_LENGTH - 3] + "...",
        "direction": "INGRESS",
        "priority": priority,
        "sourceRanges": ranges,
        verdict: [{"IPProtocol": protocol, "ports": [str(ports) for ports in service.ports]}
                  for protocol in service.protocols],
    }
    if options.gcp_network is not None:
        rule["network"] = options.gcp_network
    return rule
