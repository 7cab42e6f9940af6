"""The command line: the only place, with the agent, that builds real adapters.

One module per command family (policy, kernel and generations, journal, lab); this
module holds the group and its global options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hostwall import __version__
from hostwall.cli import export, journal, kernel, lab, policy, verify
from hostwall.cli.common import DEFAULT_KEEP, DEFAULT_POLICY_DIR, DEFAULT_STATE_DIR, Options


class HostwallGroup(click.Group):
    """The command group; a global option written after the command gets an error that
    says where it goes. It is still refused there: the sudoers drop-in admits the
    commands with any arguments and relies on global options not being one of them."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as error:
            if error.option_name in _global_option_names(self):
                raise click.UsageError(f"{error.option_name} is a global option: put it before the command "
                                       f"(hostwall {error.option_name} ... COMMAND)", error.ctx) from None
            raise


def _global_option_names(group: click.Group) -> set[str]:
    return {name for param in group.params if isinstance(param, click.Option) and not param.hidden
            for name in (*param.opts, *param.secondary_opts)} - {"-h", "--help", "--version"}


@click.group(cls=HostwallGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog="Example: hostwall --policy-dir policies/ audit --within 30d")
@click.version_option(__version__, prog_name="hostwall")
@click.option("--netns", envvar="HOSTWALL_NETNS", metavar="NAME",
              help="Make every kernel and netlink call inside network namespace NAME (/run/netns/NAME).")
# readable=False: hostwall reports unreadable paths itself, after the privilege check,
# so that a user without root learns what is needed rather than a permission detail.
@click.option("--policy-dir", envvar="HOSTWALL_POLICY_DIR", type=click.Path(path_type=Path, readable=False),
              default=DEFAULT_POLICY_DIR, show_default=True,
              help="Policy directory (*.yaml, merged) or a single policy file.")
@click.option("--state-dir", envvar="HOSTWALL_STATE_DIR", type=click.Path(path_type=Path, readable=False),
              default=DEFAULT_STATE_DIR, show_default=True, help="Where generations are kept.")
@click.option("--keep-generations", envvar="HOSTWALL_KEEP_GENERATIONS", type=click.IntRange(min=1),
              default=DEFAULT_KEEP, show_default=True, help="How many generations the state directory keeps.")
@click.option("-q", "--quiet", is_flag=True, help="No output on success: the exit code says it. Errors still go "
              "to stderr; --json output is still printed.")
@click.pass_context
def main(ctx: click.Context, netns: str | None, policy_dir: Path, state_dir: Path, keep_generations: int,
         quiet: bool) -> None:
    """hostwall: protected service ports answer only to allowlisted sources.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 usage error, 3 invalid policy,
    4 kernel error, 5 not permitted, 6 state directory error, 7 lock busy,
    10 needs attention (plan: changes pending; status: drift; check: denied;
    audit: findings at or above --fail-on; verify: a difference).

    \b
    Shell completion: eval "$(_HOSTWALL_COMPLETE=bash_source hostwall)" in ~/.bashrc,
    or eval "$(_HOSTWALL_COMPLETE=zsh_source hostwall)" in ~/.zshrc.
    """
    ctx.obj = Options(netns, policy_dir, state_dir, keep_generations, quiet)


for command in (
    policy.validate, kernel.plan, kernel.apply, kernel.confirm, kernel.rollback, kernel.generations, kernel.diff,
    kernel.status, policy.check, policy.audit, policy.owners, policy.revoke, journal.drops, journal.agent,
    lab.demo, kernel.revert_unconfirmed, kernel.disable,
):
    main.add_command(command)
main.add_command(export.export)
main.add_command(verify.verify_command)
