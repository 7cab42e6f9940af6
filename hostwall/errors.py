"""The exception tree. Adapters translate foreign errors into these at their boundary;
the CLI catches only HostwallError and maps each class to a documented exit code."""

from __future__ import annotations

from msgspec import Struct


class HostwallError(Exception):
    """Base of every error hostwall reports to an operator."""

    exit_code = 1


class Problem(Struct, frozen=True):
    """One thing wrong in the policy, located precisely enough to fix it."""

    file: str
    line: int | None
    entry: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        entry = f" {self.entry}:" if self.entry else ""
        return _one_line(f"{where}:{entry} {self.message}")


def _one_line(text: str) -> str:
    """Operators' names (a quoted YAML key, a file name) may hold line breaks; an error
    stays one line, so that it is one line in a log and one record in a pipeline."""
    return "".join(ch.encode("unicode_escape").decode("ascii") if ch in _LINE_BREAKS else ch for ch in text)


_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines() cuts


class PolicyError(HostwallError):
    """The policy is invalid; nothing was sent to the kernel."""

    exit_code = 3

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        first = str(problems[0]) if problems else "invalid policy"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(first + more)


class UsageError(HostwallError):
    """A command was asked for something that cannot exist (a generation never recorded)."""

    exit_code = 2


class KernelError(HostwallError):
    """The kernel or libnftables failed a request."""

    exit_code = 4


class KernelRejected(KernelError):
    """The kernel refused a transaction; by nf_tables semantics nothing of it was applied."""


class TableNotFound(KernelError):
    """The hostwall table is not in the kernel."""


class KernelUnavailable(KernelError):
    """nf_tables, libnftables or the network namespace cannot be reached."""


class PermissionDenied(HostwallError):
    """The command needs privileges the process does not have."""

    exit_code = 5


class StateError(HostwallError):
    """The state directory cannot be read or written, or holds something unexpected."""

    exit_code = 6


class LockBusy(StateError):
    """Another hostwall process holds the lock."""

    exit_code = 7


class NetnsNotFound(HostwallError):
    """--netns names a namespace that does not exist."""

    exit_code = 4


class ExportError(HostwallError):
    """The policy cannot be written in an export target's format within that target's
    documented limits (or the options given for it are wrong); nothing was written."""

    exit_code = 3


class ExportFileError(HostwallError):
    """The file an export writes or checks cannot be read or written."""

    exit_code = 6
