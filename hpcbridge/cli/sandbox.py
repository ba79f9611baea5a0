"""``hpcbridge sandbox``: run the XNAT-compatible sandbox server."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import EXIT_ERROR, SandboxError
from .app import log, main, settings_of
from .output import echo, emit_json
from .params import Number

if TYPE_CHECKING:
    from ..sandbox import SandboxServer


@main.group("sandbox", short_help="The XNAT-compatible sandbox server, for demos and tests.")
def sandbox_group() -> None:
    """Run the XNAT-compatible sandbox server (for tests, demos and dry runs).

    \b
    Examples:
      hpcbridge sandbox start                 # background, seeded, for --profile sandbox
      hpcbridge sandbox serve --seed demo --port 8080
    """


def _option(name: str, default: Any, kind: Any, text: str, shown: bool = True) -> Any:
    """A typed option with a default, shown in --help unless ``shown`` is false."""
    return click.option(name, default=default, show_default=shown, type=kind, help=text)


# The options of ``serve`` that go to AuthSettings and Faults, by their field names.
AUTH_OPTIONS = (
    "max_sessions session_timeout token_lifetime max_failed_logins lockout_seconds guest_access"
).split()
FAULT_OPTIONS = "latency fail_every drop_every drop_after".split()
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@sandbox_group.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@_option("--port", 0, click.IntRange(0, 65535), "Port to bind; 0 picks a free one.")
@click.option(
    "--data",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Archive folder, kept across restarts [default: a temporary folder].",
)
@click.option("--seed", type=click.Choice(["demo"]), help="Fill the archive with a seed project.")
@click.option("--admin-user", default="admin", show_default=True)
@click.option(
    "--admin-password",
    default="admin",
    show_default=True,
    help="Password of the sandbox admin (a throwaway test credential).",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Write JSON {url, user, password, pid} here (0600) once accepting connections.",
)
@_option(
    "--max-sessions",
    1000,
    click.IntRange(1),
    "Live sessions a user may hold; further logins get 401.",
)
@_option("--session-timeout", 900.0, Number(0.1), "Seconds an idle session lives.")
@_option("--token-lifetime", 172800.0, Number(0.1), "Seconds an alias token lives.")
@_option(
    "--max-failed-logins", 20, click.IntRange(1), "Failed logins in a row that lock an account."
)
@click.option(
    "--lockout",
    "lockout_seconds",
    default=3600.0,
    show_default=True,
    type=Number(0),
    help="Seconds an account stays locked.",
)
@click.option(
    "--guest-access",
    is_flag=True,
    help="Serve requests without a live session as the user 'guest' (who sees no project) "
    "instead of answering 401, as an XNAT that allows guests does.",
)
@_option("--latency", 0.0, Number(0), "Fault: seconds added to every answer.", shown=False)
@_option("--fail-every", 0, click.IntRange(0), "Fault: every Nth request answers 503.", shown=False)
@_option(
    "--drop-every",
    0,
    click.IntRange(0),
    "Fault: every Nth body transfer is cut (see --drop-after).",
    shown=False,
)
@_option("--drop-after", 65536, click.IntRange(0), "Fault: bytes that pass before a cut.")
@click.pass_context
def sandbox_serve(ctx: click.Context, ready_file: str | None, **options: Any) -> None:
    """Serve the sandbox XNAT in the foreground until Ctrl-C or SIGTERM.

    \b
    Example:
      hpcbridge sandbox serve --seed demo --port 0 --ready-file sandbox.json
      curl -u admin:admin "$(jq -r .url sandbox.json)/data/projects?format=json"
    """
    server = _server(options)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        if ready_file:
            server.write_ready_file(ready_file)
        echo(
            f"sandbox XNAT at {server.url}  (user {server.user}, password "
            f"{server.password}; data in {server.data_dir})",
            err=settings_of(ctx).json,
        )
        if settings_of(ctx).json:
            emit_json(server.ready_info())
        sys.stdout.flush()
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)


def _server(options: dict[str, Any]) -> SandboxServer:
    """The server ``serve``'s options describe, listening (not serving yet)."""
    from ..sandbox import AuthSettings, Faults, SandboxServer

    auth = AuthSettings(**{k: options.pop(k) for k in AUTH_OPTIONS})
    faults = Faults(**{k: options.pop(k) for k in FAULT_OPTIONS})
    host, port = options["host"], options["port"]
    try:
        server = SandboxServer(options.pop("data"), auth=auth, faults=faults, **options)
    except OSError as exc:
        raise SandboxError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if host not in LOOPBACK:
        log.warning("the sandbox listens on %s without TLS and with a test credential", host)
    return server


@sandbox_group.command("start")
@click.option(
    "--seed",
    type=click.Choice(["demo", "none"]),
    default="demo",
    show_default=True,
    help="Seed a new archive ('none' starts it empty).",
)
@click.option("--port", default=0, show_default=True, type=click.IntRange(0, 65535))
@click.pass_context
def sandbox_start(ctx: click.Context, seed: str, port: int) -> None:
    """Start the sandbox in the background for `--profile sandbox`.

    Its archive lives in $HPCBRIDGE_HOME/sandbox/data and survives restarts.

    \b
    Example:
      hpcbridge sandbox start && hpcbridge --profile sandbox ls PTV000
    """
    from ..sandbox.control import SandboxPaths, start

    settings = settings_of(ctx)
    info, started = start(
        SandboxPaths.under(settings.home), seed=None if seed == "none" else seed, port=port
    )
    public: dict[str, Any] = {k: info[k] for k in ("url", "user", "pid", "data") if k in info}
    if settings.json:
        emit_json(dict(public, started=started))
        return
    verb = "started" if started else "already running"
    echo(
        f"sandbox XNAT {verb} at {info['url']} (pid {info['pid']}); "
        f"use it with: hpcbridge --profile sandbox ls"
    )


@sandbox_group.command("stop")
@click.pass_context
def sandbox_stop(ctx: click.Context) -> None:
    """Stop the background sandbox (its archive is kept).

    \b
    Example:
      hpcbridge sandbox stop
    """
    from ..sandbox.control import SandboxPaths, stop

    stopped = stop(SandboxPaths.under(settings_of(ctx).home))
    echo("sandbox stopped" if stopped else "no sandbox was running", err=not stopped)


@sandbox_group.command("status")
@click.pass_context
def sandbox_status(ctx: click.Context) -> None:
    """Say whether the background sandbox runs, and where (exit 1 when it does not).

    \b
    Examples:
      hpcbridge sandbox status
      hpcbridge --json sandbox status
    """
    from ..sandbox.control import SandboxPaths, running

    settings = settings_of(ctx)
    info = running(SandboxPaths.under(settings.home))
    if settings.json:
        about = {k: info[k] for k in ("url", "pid", "data")} if info else {}
        emit_json({"running": info is not None, **about})
        if info is None:
            ctx.exit(EXIT_ERROR)  # as without --json: scripts may test the exit code alone
        return
    if info is None:
        echo("sandbox not running (start it with `hpcbridge sandbox start`)")
        ctx.exit(EXIT_ERROR)
    echo(f"sandbox running at {info['url']} (pid {info['pid']}, data {info['data']})")
