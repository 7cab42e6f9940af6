"""What every command shares: the global options, privileges, errors and output."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from msgspec import Struct

from hostwall.errors import HostwallError, PermissionDenied, PolicyError, StateError
from hostwall.output import Output
from hostwall.text import is_control, printable

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


class Options(Struct):
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

    def policy(self, path: Path | None = None, *, write_cache: bool = False) -> Policy:
        """The policy; only a command that changes the firewall (write_cache) stores parsed
        lists in the state directory: the others write nothing anywhere."""
        from hostwall.policy import load_policy

        with self.out.progress() as progress:
            return load_policy(path or self.policy_dir, cache=self.state().list_cache(writable=write_cache),
                               progress=progress)

    def engine(self) -> Engine:
        from hostwall.engine import Engine
        from hostwall.nft import NftBackend

        return Engine(NftBackend(self.netns), self.state(), spawn_reverter=self.spawn_reverter)

    def release_kernel(self, engine: Engine) -> None:
        """The command needs the kernel no more: its netlink sockets are released on a
        thread of their own. Closing a socket after a commit that removed anything waits
        for the kernel to free it (an RCU grace period, 10-30 ms); the command's output
        and the interpreter's exit need not. The process ends only once that thread has
        (the kernel reaps a process after its last thread), so nothing outlives it."""
        import threading

        threading.Thread(target=engine.close, name="netlink-release", daemon=True).start()

    def spawn_reverter(self, pending: Pending) -> None:
        """A detached process that enforces the confirm deadline even if this one, its
        terminal or the SSH session dies right after apply returns."""
        spawn_reverter(pending, self.state_dir, self.netns)


# What a process started as root gets of the caller's environment: nothing. sudo keeps
# the caller's working directory, and `python -m` puts it first on sys.path, so the
# reverter runs isolated (-I: no working directory, no PYTHON* variables, no user site)
# from /, and imports only what is installed beside the interpreter.
ROOT_CHILD_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
REVERTER_READY = b"hostwall reverter ready\n"
REVERTER_START_SECONDS = 60.0


def reverter_command(state_dir: Path, netns: str | None, generation: int) -> list[str]:
    if not sys.executable or not os.path.isabs(sys.executable):
        raise StateError("cannot start the reverter: the Python interpreter's path is unknown")
    command = [sys.executable, "-I", "-m", "hostwall", "--state-dir", str(state_dir.absolute())]
    if netns:
        command += ["--netns", netns]
    return [*command, "revert-unconfirmed", str(generation)]


def spawn_reverter(pending: Pending, state_dir: Path, netns: str | None) -> None:
    """Start the reverter and wait until it says it runs: a reverter that cannot start
    (hostwall not installed for this interpreter) must not leave a change that nobody
    will revert without a word."""
    import select
    import subprocess

    command = reverter_command(state_dir, netns, pending.generation)
    try:
        process = subprocess.Popen(
            command, cwd="/", env=dict(ROOT_CHILD_ENVIRONMENT), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
        )
    except OSError as exc:
        raise StateError(f"cannot start the reverter ({command[0]}): {exc.strerror}; the change stays "
                         "pending: run `hostwall confirm` or `hostwall rollback`") from exc
    assert process.stdout is not None
    with process.stdout:
        ready, _, _ = select.select([process.stdout], [], [], REVERTER_START_SECONDS)
        said = os.read(process.stdout.fileno(), len(REVERTER_READY)) if ready else b""
    if said != REVERTER_READY:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    # The process started here forks the reverter off and exits (its child is init's).
    process.wait()
    if said != REVERTER_READY:
        raise StateError(f"the reverter did not start (`{' '.join(command)}` exited with "
                         f"{process.returncode}); the change stays pending: run `hostwall confirm` or "
                         "`hostwall rollback`")


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
            click.echo(f"hostwall: {printable(str(problem))}", err=True)
        click.echo(f"hostwall: policy invalid ({len(error.problems)} problems); nothing was applied", err=True)
    else:
        click.echo(f"hostwall: {printable(str(error))}", err=True)
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
# A confirmation window is for the operator who just made the change, not a timer for
# later: a day is plenty, and it keeps every deadline a moment that comes.
CONFIRM_WITHIN_MAX = 86400.0


def _confirm_window(ctx: click.Context, param: click.Parameter, seconds: float | None) -> float | None:
    """click's FloatRange lets nan through (every comparison with nan is false), and inf
    or 1e300 make a deadline that never comes: a finite number of seconds, bounded."""
    if seconds is not None and (not math.isfinite(seconds) or not 1 <= seconds <= CONFIRM_WITHIN_MAX):
        raise click.BadParameter(f"{seconds} is not between 1 and {CONFIRM_WITHIN_MAX:.0f} seconds", ctx, param)
    return seconds


confirm_option = click.option(
    "--confirm-within", type=float, default=None, metavar="SECONDS", callback=_confirm_window,
    help="Revert to the last confirmed generation unless `hostwall confirm` runs within SECONDS "
         f"(1 to {CONFIRM_WITHIN_MAX:.0f}).")

# What an operator writes into a generation's record, shown later by `generations`.
MESSAGE_MAX = 500


def _message(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if len(value) > MESSAGE_MAX:
        raise click.BadParameter(f"is {len(value)} characters long; at most {MESSAGE_MAX} are kept", ctx, param)
    bad = next((ch for ch in value if is_control(ch)), None)
    if bad is not None:
        raise click.BadParameter(f"holds the control character {bad!r}; write the message on one line, "
                                 "in plain text", ctx, param)
    return value


message_option = click.option("-m", "--message", default="", callback=_message,
                              help=f"Why this change is made (kept with the generation; one line, at most "
                                   f"{MESSAGE_MAX} characters).")


pass_options = click.make_pass_decorator(Options)
