"""Each format's renderer and the service it exports when --service is not given."""

from __future__ import annotations

from collections.abc import Callable

from msgspec import Struct

from hostwall.export import aws_sg, azure_nsg, gcp_firewall, kong, nginx, pg_hba
from hostwall.export.model import ExportModel, TargetOptions


class Format(Struct, frozen=True):
    render: Callable[[ExportModel, TargetOptions], str]
    default_service: str | None  # None: every service of the policy


FORMATS: dict[str, Format] = {
    "nginx": Format(nginx.render, "https"),
    "pg_hba": Format(pg_hba.render, "postgres"),
    "aws-sg": Format(aws_sg.render, None),
    "azure-nsg": Format(azure_nsg.render, None),
    "gcp-firewall": Format(gcp_firewall.render, None),
    "kong": Format(kong.render, "https"),
}
