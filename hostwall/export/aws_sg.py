"""AWS: the request of EC2 AuthorizeSecurityGroupIngress, for
`aws ec2 authorize-security-group-ingress --cli-input-json file://FILE [--group-id sg-...]`.

One IpPermission per protocol and port range, with the IPv4 sources in IpRanges and the
IPv6 ones in Ipv6Ranges. AWS counts each source range of each permission as one inbound
rule, IPv4 and IPv6 separately, against the "inbound rules per security group" quota
(60 by default, adjustable): more is refused here rather than half-applied there.
"""

from __future__ import annotations

import re
from typing import Any

from hostwall.errors import ExportError
from hostwall.export.model import ExportedRule, ExportModel, TargetOptions
from hostwall.export.text import as_json, printable, restricted
from hostwall.policyspec import PortRange

# EC2's documented rule description: up to 255 characters of a-z, A-Z, 0-9, spaces and
# ._-:/()#,@[]+=&;{}!$* (IpRange); '&' is left out because other kinds of rule refuse it.
DESCRIPTION_CHARACTERS = re.compile(r"[a-zA-Z0-9 ._\-:/()#,@\[\]+=;{}!$*]")
DESCRIPTION_LENGTH = 255


def render(model: ExportModel, options: TargetOptions) -> str:
    permissions: dict[tuple[str, PortRange], dict[int, dict[str, list[ExportedRule]]]] = {}
    for service in model.services:
        for transport in service.protocols:
            for ports in service.ports:
                families = permissions.setdefault((transport, ports), {4: {}, 6: {}})
                for network, rules in service.networks():
                    families[network.version].setdefault(str(network), []).extend(rules)
    for family in (4, 6):
        used = sum(len(families[family]) for families in permissions.values())
        if used > options.aws_rules_per_group:
            raise ExportError(
                f"aws-sg: {used} inbound IPv{family} rules (one per source range, protocol and port range) exceed "
                f"{options.aws_rules_per_group} inbound rules per security group (AWS's quota, 60 by default and "
                "counted per family): export each service to its own group with --service, or raise the quota "
                "and pass --aws-rules-per-group")
    request: dict[str, Any] = {"IpPermissions": []}
    if options.aws_group_id is not None:
        request["GroupId"] = options.aws_group_id
    for (protocol, ports), families in sorted(permissions.items()):
        permission: dict[str, Any] = {"IpProtocol": protocol, "FromPort": ports.first, "ToPort": ports.last}
        if families[4]:
            permission["IpRanges"] = [{"CidrIp": cidr, "Description": _description(rules)}
                                      for cidr, rules in families[4].items()]
        if families[6]:
            permission["Ipv6Ranges"] = [{"CidrIpv6": cidr, "Description": _description(rules)}
                                        for cidr, rules in families[6].items()]
        if families[4] or families[6]:
            request["IpPermissions"].append(permission)
    if not request["IpPermissions"]:
        raise ExportError("aws-sg: no live entries to authorize; AuthorizeSecurityGroupIngress needs at least one")
    return as_json(request)


def _description(rules: list[ExportedRule]) -> str:
    text = "; ".join(f"{printable(rule.owner)}: {printable(rule.reason)}" for rule in rules)
    return restricted(text, DESCRIPTION_CHARACTERS, DESCRIPTION_LENGTH)
