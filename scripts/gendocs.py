"""Man pages and shell completion files, generated from the click commands themselves, so
that they say what `--help` says (no hand-written copy to drift).

    python scripts/gendocs.py --man DIR --completions DIR

writes DIR/hostwall.8 and DIR/hostwall-COMMAND.8 for every visible command, and the
bash, zsh and fish completion scripts click generates (hostwall, _hostwall,
hostwall.fish). The date in the pages comes from SOURCE_DATE_EPOCH when it is set
(Debian's reproducible builds), so two builds of one source give the same bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from hostwall import __version__
from hostwall.cli import every_command, main

PROG = "hostwall"
COMPLETION_FILES = {"bash": "hostwall", "zsh": "_hostwall", "fish": "hostwall.fish"}
EXIT_STATUS = (
    ("0", "success; plan: no changes; check: allowed"),
    ("1", "unexpected error"),
    ("2", "usage error (bad option or argument, or a generation that does not exist)"),
    ("3", "invalid policy: nothing was applied"),
    ("4", "kernel error"),
    ("5", "not permitted (needs root or CAP_NET_ADMIN)"),
    ("6", "state directory error"),
    ("7", "lock busy: another hostwall command holds it"),
    ("10", "needs attention: plan and apply --check: changes pending; status: drift; check: denied; "
           "audit: findings at or above --fail-on"),
)
FILES = (
    ("/etc/hostwall/policies/", "the policy files (*.yaml), merged"),
    ("/etc/default/hostwall", "settings of the agent (hostwall.service reads it)"),
    ("/var/lib/hostwall/", "generations, the lock and the agent's heartbeat"),
    ("/usr/share/doc/hostwall/examples/", "example policies"),
)


def roff(text: str) -> str:
    """Text safe in a roff body: backslashes and hyphens escaped, no line starting with a
    control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def paragraphs(help_text: str) -> list[tuple[bool, str]]:
    """click's help text as (verbatim, text) paragraphs; \\b marks a verbatim one."""
    result = []
    for block in re.split(r"\n\s*\n", click.unstyle(help_text).strip()):
        lines = block.splitlines()
        if lines and lines[0].strip() == "\b":
            result.append((True, "\n".join(line.strip() for line in lines[1:])))
        else:
            result.append((False, " ".join(line.strip() for line in lines)))
    return result


def body(help_text: str) -> list[str]:
    out: list[str] = []
    for verbatim, text in paragraphs(help_text):
        out.append(".PP")
        if verbatim:
            out += [".nf", roff(text), ".fi"]
        else:
            out.append(roff(text))
    return out


def options_section(command: click.Command, ctx: click.Context) -> list[str]:
    out: list[str] = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):  # named in the synopsis; click gives them no help
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        out += [".TP", f"\\fB{roff(names)}\\fR", roff(text) if text else ""]
        envvar = getattr(param, "envvar", None)
        if isinstance(envvar, str) and envvar not in text:
            out.append(f"(environment: \\fB{roff(envvar)}\\fR)")
    return out


def header(name: str, date: str) -> list[str]:
    return [f'.TH "{name.upper()}" "8" "{date}" "hostwall {__version__}" "System Administration"']


def visible_commands() -> dict[str, click.Command]:
    return {name: command for name, command in sorted(every_command().items()) if not command.hidden}


def command_page(name: str, command: click.Command, date: str) -> str:
    with click.Context(main, info_name=PROG, **main.context_settings) as parent, \
            click.Context(command, info_name=name, parent=parent, **command.context_settings) as ctx:
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines = header(f"{PROG}-{name}", date)
        lines += [".SH NAME", f"{PROG}\\-{roff(name)} \\- {roff(command.get_short_help_str(limit=200))}",
                  ".SH SYNOPSIS", f"\\fB{PROG}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fB{roff(name)}\\fR {roff(usage)}",
                  ".SH DESCRIPTION", *body(command.help or "")]
        options = options_section(command, ctx)
        if options:
            lines += [".SH OPTIONS", *options]
        lines += [".SH SEE ALSO", f"\\fB{PROG}\\fR(8)"]
    return "\n".join(lines) + "\n"


def main_page(date: str) -> str:
    with click.Context(main, info_name=PROG, **main.context_settings) as ctx:
        lines = header(PROG, date)
        lines += [".SH NAME", f"{PROG} \\- {roff(main.get_short_help_str(limit=200).partition(': ')[2])}",
                  ".SH SYNOPSIS", f"\\fB{PROG}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
                  ".SH DESCRIPTION"]
        # The exit codes and the completion hint get sections of their own below.
        description = [p for p in paragraphs(main.help or "") if not p[1].startswith(("Exit codes", "Shell"))]
        for verbatim, text in description:
            lines += [".PP", *([".nf", roff(text), ".fi"] if verbatim else [roff(text)])]
        lines += [".SH GLOBAL OPTIONS", *options_section(main, ctx), ".SH COMMANDS"]
        for name, command in visible_commands().items():
            lines += [".TP", f"\\fB{roff(name)}\\fR", f"{roff(command.get_short_help_str(limit=200))} "
                      f"See \\fB{PROG}\\-{roff(name)}\\fR(8)."]
        lines.append(".SH EXIT STATUS")
        for code, meaning in EXIT_STATUS:
            lines += [".TP", f"\\fB{code}\\fR", roff(meaning)]
        lines.append(".SH FILES")
        for path, meaning in FILES:
            lines += [".TP", f"\\fI{roff(path)}\\fR", roff(meaning)]
        lines += [".SH SEE ALSO", ", ".join(f"\\fB{PROG}\\-{roff(name)}\\fR(8)" for name in visible_commands())
                  + ", \\fBnft\\fR(8), \\fBsystemd.exec\\fR(5)"]
    return "\n".join(lines) + "\n"


def man_pages() -> dict[str, str]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = time.strftime("%Y-%m-%d", time.gmtime(int(epoch))) if epoch and epoch.isdigit() else ""
    pages = {f"{PROG}.8": main_page(date)}
    pages.update({f"{PROG}-{name}.8": command_page(name, command, date)
                  for name, command in visible_commands().items()})
    return pages


def completions() -> dict[str, str]:
    result = {}
    for shell, filename in COMPLETION_FILES.items():
        completion = get_completion_class(shell)
        assert completion is not None, shell
        result[filename] = completion(main, {}, PROG, "_HOSTWALL_COMPLETE").source()
    return result


def write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--man", type=Path, help="write the man pages (section 8) here")
    parser.add_argument("--completions", type=Path, help="write the bash, zsh and fish completions here")
    args = parser.parse_args(argv)
    if args.man:
        write(args.man, man_pages())
    if args.completions:
        write(args.completions, completions())
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
