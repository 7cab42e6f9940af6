"""What every command shares: the global options, privileges, errors and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from hostwall.errors import HostwallError, PermissionDenied, PolicyError
from hostwall.output import Output

# The policy models (pydantic) and everything built on them are imported by the commands
# that use them: `hostwall --help` and shell completion then start in a third of the time
# (tests/bench/bench_cli.py).
if TYPE_CHECKING:
    from hostwall.engine import Engine
    from hostwall.policy import Policy
    from hostwall.state import Pending, StateDir

DEFAULT_POLICY_DIR = Path("/etc/hostwall/policies")
# hostwall.state's defaults, repeated so that --help need not import it (a unit test
# holds them equal).
DEFAULT_STATE_DIR = Path("/var/lib/hostwall")
DEFAULT_KEEP = 50
EXIT_OK = 0
EXIT_NEEDS_ATTENTION = 10  # plan: changes pending; status: drift; check: denied
CAP_NET_ADMIN = 12

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Options:
    netns: str | None
    policy_dir: Path
    state_dir: Path
    keep_generations: int = DEFAULT_KEEP
    quiet: bool = False

    @property
    def out(self) -> Output:
        return Output(quiet=self.quiet)

    def state(self) -> StateDir:
        from hostwall.state import StateDir

        return StateDir(self.state_dir, keep=self.keep_generations)

    def policy(self, path: Path | None = None) -> Policy:
        from hostwall.policy import load_policy

        with self.out.progress() as progress:
            return load_policy(path or self.policy_dir, cache=self.state().list_cache(), progress=progress)

    def engine(self) -> Engine:
        from hostwall.engine import Engine
        from hostwall.nft import NftBackend

        return Engine(NftBackend(self.netns), self.state(), spawn_reverter=self.spawn_reverter)

    def spawn_reverter(self, pending: Pending) -> None:
        """A detached process that enforces the confirm deadline even if this one, its
        terminal or the SSH session dies right after apply returns."""
        command = [sys.executable, "-m", "hostwall", "--state-dir", str(self.state_dir)]
        if self.netns:
            command += ["--netns", self.netns]
        command += ["revert-unconfirmed", str(pending.generation)]
        subprocess.Popen(
            command, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
        )



def has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def require_privileges(command: str) -> None:
    if not has_net_admin():
        raise PermissionDenied(
            f"hostwall {command} changes or reads the kernel firewall and needs root "
            f"(CAP_NET_ADMIN): run `sudo hostwall {command} ...`"
        )


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def fail(error: HostwallError, as_json: bool) -> NoReturn:
    if as_json:
        payload: dict[str, Any] = {"error": str(error), "kind": type(error).__name__,
                                   "exit_code": error.exit_code}
        if isinstance(error, PolicyError):
            payload["problems"] = [str(p) for p in error.problems]
        emit_json(payload)
    if isinstance(error, PolicyError) and len(error.problems) > 1:
        for problem in error.problems:
            click.echo(f"hostwall: {problem}", err=True)
        click.echo(f"hostwall: policy invalid ({len(error.problems)} problems); nothing was applied", err=True)
    else:
        click.echo(f"hostwall: {error}", err=True)
    sys.exit(error.exit_code)


def reports_errors(function: F) -> F:
    """Translate the project's errors into one line and a documented exit code."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except HostwallError as error:
            fail(error, bool(kwargs.get("as_json")))

    return wrapper  # type: ignore[return-value]


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
wait_option = click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
                           help="Seconds to wait for another hostwall command holding the lock.")
confirm_option = click.option(
    "--confirm-within", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
    help="Revert to the last confirmed generation unless `hostwall confirm` runs within SECONDS.")


pass_options = click.make_pass_decorator(Options)
