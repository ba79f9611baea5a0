"""The ``hpcbridge`` command line: parse options, call the library, format results and errors.

This is where commands exit, and ``output`` is where everything is printed. Library errors
(``hpcbridge.errors``) become one line on stderr, ``hpcbridge: error: ...``, and the exit codes
of CLI.md: 1 for a user-facing error, 2 for a usage error, 3 for partial success. ``-v`` adds
the traceback.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, NoReturn

import click

from .. import __version__
from ..config import Settings, load_settings
from ..errors import HpcBridgeError
from . import hints
from .output import echo, error_line, log_handler
from .output import fit_widths as fit_widths

log = logging.getLogger("hpcbridge")


class BridgeGroup(click.Group):
    """A click group that turns library errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HpcBridgeError as exc:
            _fail(ctx, exc.message, exc.exit_code, hint=hints.hint(exc))
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)


def _fail(ctx: click.Context, message: str, code: int, *, hint: str | None = None) -> NoReturn:
    verbose = (ctx.find_root().params.get("verbose") or 0) > 0
    if verbose:
        # The exception's message may quote a server: its traceback is escaped like the rest.
        echo(traceback.format_exc(), err=True, nl=False, multiline=True)
    error_line(message, hint)
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


def _setup_logging(verbose: int, quiet: bool) -> None:
    by_verbosity = (logging.WARNING, logging.INFO, logging.DEBUG)  # no -v, -v, -vv or more
    root = logging.getLogger("hpcbridge")
    root.handlers[:] = [log_handler()]
    root.setLevel(logging.ERROR if quiet else by_verbosity[min(verbose, 2)])


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
