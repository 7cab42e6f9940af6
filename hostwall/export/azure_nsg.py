"""Azure: an ARM template of one network security group whose security rules allow the
policy's sources and then deny each service's ports to everyone else.

Entries that share service, protocol, family, owner and reason become one rule with
several sourceAddressPrefixes, so that each rule keeps a description of who and why.
Allow rules take ascending priorities from the first one chosen; the deny rules take the
last priorities (4096 down). Deploying the template sets the group's whole rule list.
Limits checked (Azure networking limits): priorities 100-4096, 1,000 rules per group,
4,000 source addresses and ranges per group, names up to 80 characters, descriptions up
to 140.
"""

from __future__ import annotations

from typing import Any

from hostwall.errors import ExportError
from hostwall.export.model import ExportedRule, ExportedService, ExportModel, TargetOptions
from hostwall.export.text import as_json, printable

SCHEMA = "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#"
API_VERSION = "2023-09-01"
LOWEST_PRIORITY = 100
HIGHEST_PRIORITY = 4096
DESCRIPTION_LENGTH = 140
PROTOCOLS = {"tcp": "Tcp", "udp": "Udp"}


def render(model: ExportModel, options: TargetOptions) -> str:
    allows: list[tuple[ExportedService, str, list[ExportedRule]]] = []
    for service in model.services:
        for transport in service.protocols:
            groups: dict[tuple[int, str, str], list[ExportedRule]] = {}
            for rule in service.rules:
                groups.setdefault((rule.family, rule.owner, rule.reason), []).append(rule)
            allows.extend((service, transport, rules) for rules in groups.values())
    denies: list[tuple[ExportedService, str]] = [(s, transport) for s in model.services for transport in s.protocols]
    _check_limits(allows, denies, options)
    security_rules = []
    for index, (service, protocol, rules) in enumerate(allows):
        priority = options.azure_first_priority + index
        prefixes = list(dict.fromkeys(str(rule.network) for rule in rules))
        description = f"{printable(rules[0].owner)}: {printable(rules[0].reason)}"
        security_rules.append(_rule(f"{options.name_prefix}-{service.name}-{protocol}-{priority}", priority, "Allow",
                                    service, protocol, prefixes, description))
    for index, (service, protocol) in enumerate(reversed(denies)):
        priority = HIGHEST_PRIORITY - index
        security_rules.append(_rule(f"{options.name_prefix}-{service.name}-{protocol}-deny", priority, "Deny",
                                    service, protocol, None, f"hostwall: every other source to {service.name}"))
    template = {
        "$schema": SCHEMA,
        "contentVersion": "1.0.0.0",
        "parameters": {
            "networkSecurityGroupName": {"type": "string"},
            "location": {"type": "string", "defaultValue": "[resourceGroup().location]"},
        },
        "resources": [{
            "type": "Microsoft.Network/networkSecurityGroups",
            "apiVersion": API_VERSION,
            "name": "[parameters('networkSecurityGroupName')]",
            "location": "[parameters('location')]",
            "properties": {"securityRules": security_rules},
        }],
    }
    return as_json(template)


def _rule(name: str, priority: int, access: str, service: ExportedService, protocol: str,
          prefixes: list[str] | None, description: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "access": access,
        "description": description if len(description) <= DESCRIPTION_LENGTH else
        description[: DESCRIPTION_LENGTH - 3] + "...",
        "destinationAddressPrefix": "*",
        "destinationPortRanges": [str(ports) for ports in service.ports],
        "direction": "Inbound",
        "priority": priority,
        "protocol": PROTOCOLS[protocol],
        "sourcePortRange": "*",
    }
    if prefixes is None:
        properties["sourceAddressPrefix"] = "*"
    else:
        properties["sourceAddressPrefixes"] = prefixes
    return {"name": name, "properties": properties}


def _check_limits(allows: list[tuple[ExportedService, str, list[ExportedRule]]],
                  denies: list[tuple[ExportedService, str]], options: TargetOptions) -> None:
    rules = len(allows) + len(denies)
    if rules > options.azure_rules_per_nsg:
        raise ExportError(
            f"azure-nsg: {rules} security rules ({len(allows)} allow, one per service, protocol, family, owner and "
            f"reason; {len(denies)} deny) exceed {options.azure_rules_per_nsg} rules per network security group "
            "(Azure's limit): export each service to its own group with --service")
    last_allow = options.azure_first_priority + len(allows) - 1
    first_deny = HIGHEST_PRIORITY - len(denies) + 1
    if last_allow >= first_deny:
        raise ExportError(
            f"azure-nsg: {len(allows)} allow rules from priority {options.azure_first_priority} reach {last_allow}, "
            f"but priorities end at {HIGHEST_PRIORITY} and the deny rules take {first_deny}-{HIGHEST_PRIORITY}: "
            "choose a lower --azure-first-priority or export fewer services")
    prefixes = sum(len({str(rule.network) for rule in group}) for _, _, group in allows)
    if prefixes > options.azure_prefixes_per_nsg:
        raise ExportError(
            f"azure-nsg: {prefixes} source addresses and ranges exceed {options.azure_prefixes_per_nsg} per network "
            "security group (Azure's limit): export each service to its own group with --service")
