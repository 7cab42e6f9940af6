"""hostwall: allowlist host firewall for protected service ports, on nftables."""

__version__ = "0.1.0"
