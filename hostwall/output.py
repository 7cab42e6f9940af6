"""What people read: tables and colour on a terminal, plain columns when piped.

Plain output is for grep, awk and diff: no colour codes, no box drawing, one record a
line, columns separated by at least two spaces. rich is used only when the stream is a
terminal (and NO_COLOR is honoured by rich itself).

Everything shown may hold data (owners, reasons, messages, file names): control
characters are escaped on every path (hostwall.text), and rich gets Text objects,
never strings, so that brackets in data are never read as markup.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

import click

from hostwall.text import is_control, printable

__all__ = ["Output", "is_control", "plain_table", "printable"]

if TYPE_CHECKING:
    from rich.console import Console

# Colours by meaning, so that every command says "bad" the same way.
STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green", "muted": "dim",
          "denied": "bold red", "allowed": "green"}

Progress = Callable[[str, int, int], None]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, terminal: bool | None = None,
                 err: TextIO | None = None) -> None:
        self.quiet = quiet
        self._stream = stream
        self._err = err
        self._terminal = terminal

    @property
    def stream(self) -> TextIO:
        # Looked up late: click's test runner swaps sys.stdout after this object is made.
        return self._stream or sys.stdout

    @property
    def terminal(self) -> bool:
        return self._terminal if self._terminal is not None else _is_terminal(self.stream)

    def _console(self, stream: TextIO) -> Console:
        # rich is imported only for a terminal: it costs start-up time that scripted runs skip.
        from rich.console import Console

        return Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True)

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.quiet:
            return
        text = printable(text)
        if self.terminal and style:
            from rich.text import Text

            self._console(self.stream).print(Text(text, style=STYLES.get(style, style)))
        else:
            click.echo(text, file=self.stream)

    def warn(self, text: str) -> None:
        """A warning on stderr; --quiet keeps it, since it is about the result's validity."""
        click.echo(f"warning: {printable(text)}", err=True)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None,
              styles: Sequence[str | None] | None = None, right: Sequence[int] = ()) -> None:
        """rows of cells; styles gives each row's style on a terminal; right lists the
        columns aligned right (numbers)."""
        if self.quiet:
            return
        headers = [printable(h) for h in headers]
        rows = [[printable(cell) for cell in row] for row in rows]
        title = printable(title) if title is not None else None
        if self.terminal:
            from rich.table import Table
            from rich.text import Text

            table = Table(title=Text(title) if title is not None else None, title_justify="left",
                          header_style="bold")
            for index, header in enumerate(headers):
                table.add_column(Text(header), justify="right" if index in right else "left", overflow="fold")
            for index, row in enumerate(rows):
                style = styles[index] if styles else None
                # Only the first cell is coloured: a whole coloured row is hard to read.
                first = Text(row[0], style=STYLES.get(style, style) if style else "")
                table.add_row(first, *(Text(cell) for cell in row[1:]))
            self._console(self.stream).print(table)
            return
        if title:
            click.echo(title, file=self.stream)
        for line in plain_table(headers, rows, right=right):
            click.echo(line, file=self.stream)

    @contextmanager
    def progress(self, minimum: int = 20_000) -> Iterator[Progress]:
        """A progress callback (label, done, total) that draws a bar on stderr only when
        stderr is a terminal and the work is at least minimum units."""
        err = self._err or sys.stderr
        if self.quiet or not _is_terminal(err):
            yield lambda label, done, total: None
            return
        from rich.progress import Progress as Bar
        from rich.progress import TaskID

        # Started at the first long piece of work, so short runs draw nothing at all.
        bar: Bar | None = None
        tasks: dict[str, TaskID] = {}

        def update(label: str, done: int, total: int) -> None:
            nonlocal bar
            if total < minimum:
                return
            if bar is None:
                bar = Bar(console=self._console(err), transient=True)
                bar.start()
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        try:
            yield update
        finally:
            if bar is not None:
                bar.stop()


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [fmt(headers), *(fmt(row) for row in rows)]
