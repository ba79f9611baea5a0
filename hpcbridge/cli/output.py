"""Everything the command line writes to the terminal goes through here.

Commands show data they do not control: XNAT labels, scan types, file names and error bodies,
scheduler answers, job log tails. Each writer below passes that text through
:func:`hpcbridge.text.printable`, so a control sequence in it is shown escaped (``\\x1b[2J``)
instead of being obeyed by the terminal. Only the frames this module draws itself (the
carriage return and erase-line of a progress line) reach the terminal raw.

``--json`` output is left to :func:`emit_json`: ``json.dumps`` escapes every control and
non-ASCII character, and a parser gives scripts back the exact original value.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import click

from ..text import printable
from ..units import human_size
from .hints import WORDS

# Erase from the cursor to the end of the line: a shorter progress line must not leave the
# tail of a longer one behind.
_ERASE_LINE = "\033[K"


def echo(text: object = "", *, err: bool = False, nl: bool = True, multiline: bool = False) -> None:
    """Print one line (``multiline=True``: a block of lines such as a log tail or a script).

    A one-line message that quotes a server's words stays one line: a newline in them is
    shown as ``\\n`` rather than starting what could pass for a line of our own.
    """
    click.echo(printable(text, multiline=multiline), err=err, nl=nl)


def emit_document(text: str) -> None:
    """A whole file (a rendered job script) on stdout.

    On a terminal it is shown escaped like any other text; redirected to a file or a pipe it is
    the file itself, byte for byte, as ``-o FILE`` would write it.
    """
    if sys.stdout.isatty():
        echo(text, nl=False, multiline=True)
    else:
        click.echo(text, nl=False)


def warn(message: object) -> None:
    """``hpcbridge: warning: ...`` on stderr."""
    echo(f"hpcbridge: warning: {printable(message)}", err=True)


def error_line(message: str, hint: str | None = None) -> None:
    """``hpcbridge: error: message (hint)`` on stderr, on one line whatever the message holds."""
    line = f"hpcbridge: error: {message}"
    if hint:
        line += f" ({hint})"
    echo(line, err=True)


def emit_json(data: Any) -> None:
    # ensure_ascii (json's default, spelt out because it matters): controls, C1, bidi and
    # every other non-ASCII character come out as \uXXXX, so even --json read on a terminal
    # cannot drive it, and any JSON parser returns the exact original string.
    click.echo(json.dumps(data, indent=2, ensure_ascii=True))


def emit_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, indent: str = ""
) -> None:
    """Print rows as aligned columns (``columns`` is (key, heading) pairs).

    On a terminal the widest columns are shortened with an ellipsis to fit its width; piped
    output keeps every character (scripts should prefer --json). A cell is always one line:
    a tab or newline in a value would break the columns, so it is escaped like any control.
    """
    if not rows:
        return
    heads = [h.strip() for _, h in columns]
    cells = [[printable(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    if sys.stdout.isatty():
        widths = fit_widths(widths, shutil.get_terminal_size().columns - len(indent))
    click.echo(indent + _line(heads, widths))
    for line in cells:
        click.echo(indent + _line(line, widths))


def fit_widths(widths: list[int], limit: int, floor: int = 6) -> list[int]:
    """Shrink the widest columns until the row (with 2-space gaps) fits ``limit``."""
    widths = list(widths)
    while sum(widths) + 2 * (len(widths) - 1) > limit:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= floor:
            break
        widths[widest] -= 1
    return widths


def _line(values: Sequence[str], widths: Sequence[int]) -> str:
    out = []
    for value, width in zip(values, widths, strict=True):
        if len(value) > width:
            value = value[: max(width - 1, 0)] + "\u2026"
        out.append(value.ljust(width))
    return "  ".join(out).rstrip()


def status_line(text: str, *, in_place: bool) -> None:
    """A progress line on stderr: redrawn over the previous one on a terminal (``in_place``),
    else one line each."""
    if in_place:
        click.echo("\r" + printable(text) + _ERASE_LINE, err=True, nl=False)
    else:
        echo(text, err=True)


class PrintableFormatter(logging.Formatter):
    """Log records as one line each, with server text in them escaped; a traceback keeps its
    lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        # "hpcbridge: warning: ..." as warn() prints it, whichever of the two a warning took
        shown = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        step = getattr(record, "step", None)
        words = f"; {WORDS[step]}" if step is not None else ""
        return printable(super().formatMessage(shown) + words)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return printable(super().formatException(ei), multiline=True)

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return printable(super().formatStack(stack_info), multiline=True)


def log_handler() -> logging.Handler:
    """The stderr handler of the ``hpcbridge`` logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("hpcbridge: %(levelname)s: %(message)s"))
    return handler


class ProgressBar:
    """Bytes, rate and ETA on one stderr line, only on a terminal (never when piped)."""

    def __init__(self, label: str, *, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self.total = 0
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        self.total = total

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and (now - self._last > 0.2 or self.done >= self.total > 0):
                self._last = now
                click.echo("\r" + printable(self._line(now)), err=True, nl=False)

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate and self.total else 0
        return (
            f"{self.label}: {human_size(self.done)} / {human_size(self.total)}  "
            f"{human_size(rate)}/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}   "
        )

    def close(self) -> None:
        if self.enabled and self.done:
            click.echo("", err=True)
