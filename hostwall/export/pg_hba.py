"""PostgreSQL: pg_hba.conf lines for the database service, then reject lines.

PostgreSQL uses the first line that matches a connection's type, database, user and
address, so the allow lines come first and the two reject lines (one per family) end
the list: a source that is not allowlisted is refused before any password is asked,
whatever lines follow in the file this is included into.
"""

from __future__ import annotations

from hostwall.export.model import ExportModel, TargetOptions
from hostwall.export.text import about, header


def render(model: ExportModel, options: TargetOptions) -> str:
    service = model.single("pg_hba")
    lines = [f"# {header('pg_hba', service.name, len(service.rules))}"]
    match = f"{options.pg_database} {options.pg_user}"
    for rule in service.rules:
        lines.append(f"# {about(rule)}")
        lines.append(f"{options.pg_connection} {match} {rule.network} {options.pg_auth}")
    # `host` matches connections with and without SSL: nothing else gets through.
    lines.append("# every other source address, either family")
    lines.append("host all all 0.0.0.0/0 reject")
    lines.append("host all all ::/0 reject")
    return "\n".join(lines) + "\n"
