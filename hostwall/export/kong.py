"""Kong: the ip-restriction plugin in Kong's declarative configuration (kong.yaml).

Written as YAML by hand, to keep one comment per entry with its owner and reason; every
value is a JSON string, which YAML reads as a double-quoted scalar, so no owner's text
can change the structure. Kong decides the client address from its own real_ip_header
and trusted_ips settings (kong.conf), not from this file.
"""

from __future__ import annotations

import json

from hostwall.errors import ExportError
from hostwall.export.model import ExportModel, TargetOptions
from hostwall.export.text import about, header

FORMAT_VERSION = "3.0"


def render(model: ExportModel, options: TargetOptions) -> str:
    service = model.single("kong")
    if not service.rules:
        # Kong's schema requires one of allow or deny to be non-empty; an empty allow
        # would not deny everyone, it would be refused.
        raise ExportError(f"service {service.name!r} has no live entries: Kong's ip-restriction needs at least one "
                          "address in allow; deny the route another way")
    lines = [f"# {header('kong', service.name, len(service.rules))}",
             f"_format_version: {json.dumps(FORMAT_VERSION)}",
             "plugins:",
             "- name: ip-restriction"]
    if options.kong_service is not None:
        lines.append(f"  service: {json.dumps(options.kong_service)}")
    lines += ["  config:", "    status: 403", "    allow:"]
    for network, rules in service.networks():
        lines.extend(f"    # {about(rule)}" for rule in rules)
        lines.append(f"    - {json.dumps(str(network))}")
    return "\n".join(lines) + "\n"
