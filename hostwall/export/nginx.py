"""nginx: an include file of `allow` lines (ngx_http_access_module) ending in `deny all;`.

Behind proxies the address nginx checks must be the client's, and X-Forwarded-For is
written by whoever sends the request: its leftmost value is the client's own claim. With
trusted proxies, ngx_http_realip_module takes the rightmost address that is not one of
them (`real_ip_recursive on`), which is the one the first trusted proxy saw, and only for
connections that come from a trusted proxy.
"""

from __future__ import annotations

from hostwall.export.model import ExportModel, TargetOptions
from hostwall.export.text import about, header


def render(model: ExportModel, options: TargetOptions) -> str:
    service = model.single("nginx")
    lines = [f"# {header('nginx', service.name, len(service.rules))}"]
    if options.trusted_proxies:
        lines.append("# The client address is the rightmost X-Forwarded-For address not added by these proxies.")
        lines.extend(f"set_real_ip_from {proxy};" for proxy in options.trusted_proxies)
        lines += ["real_ip_header X-Forwarded-For;", "real_ip_recursive on;"]
    for rule in service.rules:
        lines.append(f"# {about(rule)}")
        lines.append(f"allow {rule.network};")
    lines.append("deny all;")
    return "\n".join(lines) + "\n"

