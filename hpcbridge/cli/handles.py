"""What the commands of runs and jobs share: the host-key option, the session they open, which
run and profile they work on, and the run's lock."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import ConfigError, RunBusyError
from .app import settings_for, settings_of
from .output import echo

if TYPE_CHECKING:  # the CLI imports what a command needs when it runs, to start fast
    from ..ledger import Ledger, Run
    from ..runs import RunSession

F = TypeVar("F", bound=Callable[..., Any])


def host_key_option(func: F) -> F:
    return click.option(
        "--accept-new-host-key",
        is_flag=True,
        help="Trust and record the SSH host key of a host not yet in known_hosts "
        "(compare its fingerprint with the one your admins publish first). A changed key "
        "is always refused.",
    )(func)


def session(ctx: click.Context, accept_new_host_key: bool, **opened: bool) -> RunSession:
    """The command's session (``opened``: which handles, see RunSession), to use in ``with``."""
    from ..runs import RunSession
    from .server import connect

    return RunSession(
        settings_of(ctx), accept_new_host_key=accept_new_host_key, connect=connect, **opened
    )


def adopt_run_profile(ctx: click.Context, run_id: int | None) -> int:
    """The run to work on; without --profile, its own profile's settings are used from here on.

    A run started with `--profile artemis` must be synced against the same XNAT and cluster,
    also from a cron line that does not repeat the profile.
    """
    from ..ledger import Ledger

    settings = settings_of(ctx)
    with Ledger.for_settings(settings) as ledger:
        run = run_of(ledger, settings, run_id)
    if not profile_given(ctx) and run.profile != settings.profile:
        ctx.find_root().meta["settings"] = settings_for(ctx, run.profile)
    return int(run.id)


def profile_given(ctx: click.Context) -> bool:
    return bool(ctx.find_root().params.get("profile") or os.environ.get("HPCBRIDGE_PROFILE"))


def run_of(ledger: Ledger, settings: Any, run_id: int | None) -> Run:
    if run_id is not None:
        return ledger.run(run_id)
    # This profile's latest run, else the latest of any profile (sync uses the run's profile
    # settings only through the options given, so name the profile when it matters).
    run = ledger.latest_run(settings.profile) or ledger.latest_run()
    if run is None:
        raise ConfigError(
            f"no runs yet for profile {settings.profile!r}",
            hint="start one with `hpcbridge run RECIPE ADDRESS`",
        )
    return run


def take_run_lock(ctx: click.Context, run_id: int, command: str, *, wait: float | None) -> Any:
    """The run's lock, held (release it with ``with``), or RunBusyError naming its holder
    after ``wait`` seconds (None: wait for as long as it takes, saying so once)."""
    from ..runlock import RunLock

    settings = settings_of(ctx)

    def waiting(holder: Any) -> None:
        if not settings.quiet and wait != 0:
            limit = "" if wait is None else f" up to {wait:g} s"
            echo(f"run {run_id} is busy: {holder.describe()}; waiting{limit}", err=True)

    lock = RunLock.for_settings(settings, run_id, command=command)
    return lock.acquire(wait=wait, on_busy=waiting)


def busy(exc: RunBusyError, *, tell: bool = True) -> dict[str, Any]:
    """The JSON of a run that another process holds, after a line saying so (``tell``)."""
    # Not an error: a cron pass that finds another pass at work has nothing to do.
    if tell:
        echo(f"{exc.message}; skipped", err=True)
    return {"run": exc.run_id, "busy": exc.holder.to_json()}


def say(quiet: bool) -> Callable[[str], None]:
    def line(text: str) -> None:
        if not quiet:
            echo(f"  {text}", err=True)

    return line
