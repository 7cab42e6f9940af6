"""`hostwall export`: the policy's allow entries for the other layers of an allowlist.

One model of exported rules (hostwall.export.model), built once from the policy, and
one small module per target that only renders it. This module stays free of imports,
so that the command line can name the formats without loading the policy models.
"""

from __future__ import annotations

FORMATS = ("nginx", "pg_hba", "aws-sg", "azure-nsg", "gcp-firewall", "kong")
