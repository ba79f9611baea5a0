"""The ``hpcbridge`` command line: parse options, call the library, format results and errors.

This is the only module that prints or exits. Library errors (``hpcbridge.errors``) become one
line on stderr, ``hpcbridge: error: ...``, and the exit codes of CLI.md: 1 for a user-facing
error, 2 for a usage error, 3 for partial success. ``-v`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from .. import __version__
from ..config import Settings, load_settings
from ..errors import HpcBridgeError
from ..units import human_size

log = logging.getLogger("hpcbridge")


class BridgeGroup(click.Group):
    """A click group that turns library errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpcBridgeError as exc:
            _fail(ctx, exc.message, exc.exit_code, hint=exc.hint)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)


def _fail(ctx: click.Context, message: str, code: int, *, hint: str | None = None) -> NoReturn:
    verbose = (ctx.find_root().params.get("verbose") or 0) > 0
    if verbose:
        traceback.print_exc(file=sys.stderr)
    line = f"hpcbridge: error: {message}"
    if hint:
        line += f" ({hint})"
    click.echo(line, err=True)
    ctx.exit(code)


def settings_of(ctx: click.Context) -> Settings:
    """Settings resolved once per invocation, on first use."""
    root = ctx.find_root()
    if "settings" not in root.meta:
        root.meta["settings"] = settings_for(ctx, root.params.get("profile"))
    return root.meta["settings"]  # type: ignore[no-any-return]


def settings_for(ctx: click.Context, profile: str | None) -> Settings:
    """The settings of ``profile`` with this invocation's global options (config, -v, -q...)."""
    p = ctx.find_root().params
    return load_settings(
        profile=profile,
        config_path=p.get("config"),
        verbose=p.get("verbose") or 0,
        quiet=bool(p.get("quiet")),
        json=bool(p.get("json_output")),
    )


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def emit_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], *, indent: str = ""
) -> None:
    """Print rows as aligned columns (``columns`` is (key, heading) pairs).

    On a terminal the widest columns are shortened with an ellipsis to fit its width; piped
    output keeps every character (scripts should prefer --json).
    """
    if not rows:
        return
    heads = [h.strip() for _, h in columns]
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
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


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose >= 2:
        level = logging.DEBUG
    elif verbose == 1:
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hpcbridge: %(levelname)s: %(message)s"))
    root = logging.getLogger("hpcbridge")
    root.handlers[:] = [handler]
    root.setLevel(level)


@click.group(cls=BridgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", metavar="NAME", help="Profile from the config file (built in: sandbox).")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Config file [default: ~/.config/hpcbridge/config.toml].",
)
@click.option("-v", "--verbose", count=True, help="More detail on stderr; -v shows tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="Machine-readable output on stdout (progress and logs stay on stderr).",
)
@click.version_option(__version__, prog_name="hpcbridge")
def main(
    profile: str | None, config: str | None, verbose: int, quiet: bool, json_output: bool
) -> None:
    """Move imaging data between XNAT and an HPC scheduler, and run jobs in between.

    \b
    Try it with no cluster and no XNAT server:
      hpcbridge demo                        (sandbox XNAT + local scheduler + dcm2niix)
      hpcbridge --profile sandbox ls PTV000/Haofei01/Haofei01_MR1

    \b
    With your XNAT and cluster:
      hpcbridge config init --xnat https://xnat.example.org --user alice --scheduler pbs
      hpcbridge login
      hpcbridge run dcm2niix PROJECT --scan-type '*T1*' --dry-run

    Every command has --help with examples. Exit codes: 0 success, 1 error, 2 usage error,
    3 partial success.
    """
    _setup_logging(verbose, quiet)


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
                click.echo("\r" + self._line(now), err=True, nl=False)

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
