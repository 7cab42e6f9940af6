"""The namespace lab."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from hostwall.cli.common import (
    EXIT_OK,
    reports_errors,
    require_privileges,
)

if TYPE_CHECKING:
    pass


@click.command(epilog="Example: sudo hostwall demo")
@reports_errors
def demo() -> None:
    """Run the built-in namespace lab: allowed and denied clients against 443 and 5432.

    Creates three network namespaces, loads a policy into the lab server's namespace
    only, probes every port from both clients, prints the results and removes the lab.
    """
    require_privileges("demo")
    from hostwall.demo import run_demo

    sys.exit(EXIT_OK if run_demo(click.echo) else 1)

