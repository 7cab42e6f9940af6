"""The command line: the only place, with the agent, that builds real adapters.

One module per command family (policy, kernel and generations, journal, lab); this
module holds the group and its global options.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from hostwall import __version__
from hostwall.cli.common import DEFAULT_KEEP, DEFAULT_POLICY_DIR, DEFAULT_STATE_DIR, Options

# Each command's module is imported when the command runs (or help lists it), so that
# `hostwall apply` does not pay for export's or verify's imports at every start.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("policy", "validate"), "check": ("policy", "check"), "audit": ("policy", "audit"),
    "owners": ("policy", "owners"), "revoke": ("policy", "revoke"),
    "plan": ("kernel", "plan"), "apply": ("kernel", "apply"), "confirm": ("kernel", "confirm"),
    "rollback": ("kernel", "rollback"), "generations": ("kernel", "generations"), "diff": ("kernel", "diff"),
    "status": ("kernel", "status"), "revert-unconfirmed": ("kernel", "revert_unconfirmed"),
    "disable": ("kernel", "disable"),
    "drops": ("journal", "drops"), "agent": ("journal", "agent"),
    "demo": ("lab", "demo"), "export": ("export", "export"), "verify": ("verify", "verify_command"),
}


class HostwallGroup(click.Group):
    """The command group; a global option written after the command gets an error that
    says where it goes. It is still refused there: the sudoers drop-in admits the
    commands with any arguments and relies on global options not being one of them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            module, attribute = COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f"hostwall.cli.{module}"), attribute)
            assert isinstance(command, click.Command) and command.name == cmd_name, cmd_name
            self.add_command(command)
        return self.commands[cmd_name]

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


def run() -> NoReturn:
    """The `hostwall` command (the installed script, and python -m hostwall).

    The process ends once the command is done and its output is flushed, without the
    interpreter's teardown: clearing every module and collecting every object the
    command made frees nothing that the kernel does not free at exit, and it took 15 ms
    after a one-entry change and 60 ms after a 100k-entry load. Nothing hostwall does
    is left to that teardown: files are closed where they are written, children are
    reaped, and its only threads are daemons. An exception other than an exit still
    ends the usual way, with its traceback.
    """
    try:
        main(prog_name="hostwall")
        status = 0
    except SystemExit as ending:
        status = _exit_status(ending.code)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120  # output lost (a closed pipe): what the interpreter's own exit returns
    os._exit(status)


def _exit_status(code: object) -> int:
    """The status sys.exit(code) gives, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def every_command() -> dict[str, click.Command]:
    """Every command by name, each module imported (for documentation and tests)."""
    context = click.Context(main)
    commands = {name: main.get_command(context, name) for name in main.list_commands(context)}
    return {name: command for name, command in commands.items() if command is not None}
