"""``sync`` and ``retry``: move runs on, one pass at a time (from cron) or until they end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError, HpcBridgeError, PartialFailure, RunBusyError
from . import hints
from .app import main, settings_for, settings_of
from .handles import (
    adopt_run_profile,
    busy,
    host_key_option,
    profile_given,
    say,
    session,
    take_run_lock,
)
from .output import echo, emit_json, error_line
from .params import seconds_option
from .runs import _finish, move_on, summary

if TYPE_CHECKING:
    from ..config import Settings
    from ..ledger import Run
    from ..runs import SyncReport


@main.command("sync", short_help="Move a run on: poll, stage out, submit more (cron).")
@click.argument("run_id", required=False, type=int)
@click.option("--watch", is_flag=True, help="Keep syncing until the run (or every run) ends.")
@seconds_option(
    "--interval", "With --watch: seconds between passes [default: the profile's poll_interval]."
)
@host_key_option
@click.pass_context
def sync_command(
    ctx: click.Context,
    run_id: int | None,
    watch: bool,
    interval: float | None,
    accept_new_host_key: bool,
) -> None:
    """Move a run on: poll its jobs in one call, stage out finished ones, submit more.

    One pass by default (for cron); --watch repeats until the run ends. Without RUN_ID, every
    active run (of --profile, if given) gets its pass, each with its own profile. A run that
    another hpcbridge is moving is skipped with one line saying who. Safe to run at any time,
    also after a crash: nothing done is done twice.

    \b
    Examples:
      hpcbridge sync
      */10 * * * * hpcbridge --quiet sync     (crontab: every active run)
      hpcbridge sync 12 --watch
    """
    if run_id is None:
        _sync_active(ctx, watch, interval, accept_new_host_key)
        return
    run_id = adopt_run_profile(ctx, run_id)
    # --watch stays until the run ends, so it waits out another pass instead of skipping.
    data, report = _sync_run(
        ctx, run_id, watch=watch, interval=interval, accept=accept_new_host_key, wait=watch
    )
    if settings_of(ctx).json:
        emit_json(data)
    if report is not None:
        _finish(report)


def _sync_run(
    ctx: click.Context,
    run_id: int,
    *,
    watch: bool,
    interval: float | None,
    accept: bool,
    wait: bool,
    tell_busy: bool = True,
) -> tuple[dict[str, Any], SyncReport | None]:
    """One run's pass (or passes, ``watch``) under its lock: its JSON summary and report, or
    the busy line's JSON and None when another process holds the run."""
    command = "sync --watch" if watch else "sync"
    try:
        lock = take_run_lock(ctx, run_id, command, wait=None if wait else 0)
    except RunBusyError as exc:
        return busy(exc, tell=tell_busy), None
    # The lock before XNAT: a skipped pass logs in nowhere.
    with lock, session(ctx, accept) as opened:
        run = opened.ledger.run(run_id)
        report = move_on(opened, run, lock, watch=watch, interval=interval, shown=True)
    return summary(report), report


def _sync_active(ctx: click.Context, watch: bool, interval: float | None, accept: bool) -> None:
    """A pass over every active run, each under its own lock and with its own profile; with
    ``watch``, passes until none is left. One run's error or busy lock does not stop the others.

    Exit code: 1 if any run's pass failed (2 if every failure was the configuration's), else 3
    if a run ended with scans failed or cancelled, else 0.
    """
    base = settings_of(ctx)
    sweep = _Sweep()
    first = True
    while True:
        active = _active_runs(ctx, base, sweep.out, first=first)
        if not active:
            break
        for run in active:
            sweep.sync(ctx, run, accept)
        first = False
        if not watch:
            break
        time.sleep(interval or base.poll_interval)
    if base.json:
        emit_json(list(sweep.results.values()))
    if sweep.errors:
        ctx.exit(2 if all(code == 2 for code in sweep.errors) else 1)
    if sweep.partial:
        ctx.exit(3)


def _active_runs(ctx: click.Context, base: Settings, out: set[int], *, first: bool) -> list[Run]:
    from ..ledger import Ledger, RunState

    with Ledger.for_settings(base) as ledger:
        runs = ledger.runs(base.profile if profile_given(ctx) else None)
    if first and not runs:
        raise ConfigError(
            f"no runs yet for profile {base.profile!r}",
            hint="start one with `hpcbridge run RECIPE ADDRESS`",
        )
    active = [r for r in runs if r.state is RunState.ACTIVE and r.id not in out]
    if first and not active and not base.quiet:
        echo("no active runs: nothing to sync", err=True)
    return active


@dataclass
class _Sweep:
    """What the passes over every active run found so far."""

    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: list[int] = field(default_factory=list)  # the exit codes of the runs that failed
    partial: bool = False
    out: set[int] = field(default_factory=set)  # runs that failed during --watch: not tried again
    told: set[int] = field(default_factory=set)  # runs whose busy line is printed already

    def sync(self, ctx: click.Context, run: Run, accept: bool) -> None:
        root = ctx.find_root()
        base = settings_of(ctx)
        try:
            if not profile_given(ctx) and run.profile != base.profile:
                root.meta["settings"] = settings_for(ctx, run.profile)
            data, report = _sync_run(
                ctx, run.id, watch=False, interval=None, accept=accept, wait=False,
                tell_busy=run.id not in self.told,
            )  # fmt: skip
            self.results[run.id] = data
            if report is None:
                self.told.add(run.id)
            else:
                _finish(report)
        except PartialFailure as exc:
            self.partial = True
            error_line(exc.message, hints.hint(exc))
        except HpcBridgeError as exc:
            self.errors.append(exc.exit_code)
            self.out.add(run.id)
            prefix = "" if exc.message.startswith(f"run {run.id}") else f"run {run.id}: "
            error_line(prefix + exc.message, hints.hint(exc))
        finally:
            root.meta["settings"] = base


@main.command("retry")
@click.argument("run_id", type=int)
@click.option("--failed", "only_failed", is_flag=True, help="Only failed jobs (the default).")
@click.option("--cancelled", is_flag=True, help="Also cancelled jobs.")
@click.option(
    "--rerun",
    is_flag=True,
    help="Run the jobs again even where only their upload failed (their outputs are redone).",
)
@host_key_option
@click.pass_context
def retry_command(
    ctx: click.Context,
    run_id: int,
    only_failed: bool,
    cancelled: bool,
    rerun: bool,
    accept_new_host_key: bool,
) -> None:
    """Redo what failed of a run's failed jobs, in one sync pass.

    A job that ended well but whose outputs could not be uploaded is uploaded again, not run
    again; a chain whose stage-out job failed gets a new stage-out job; anything else is
    submitted again and computed from an empty output folder (with --rerun, every job).

    If another hpcbridge is moving the run (a sync, a run --wait), wait up to 30 s for it,
    then give up naming it (exit 1).

    \b
    Example:
      hpcbridge retry 12 --failed
    """
    from .. import runlock
    from ..runs import retry_run
    from ..runs import sync as passes

    adopt_run_profile(ctx, run_id)
    lock = take_run_lock(ctx, run_id, "retry", wait=runlock.BUSY_WAIT)
    with lock, session(ctx, accept_new_host_key) as opened:
        settings = opened.settings
        run = opened.ledger.run(run_id)
        again = retry_run(
            opened.ledger, run, include_cancelled=cancelled and not only_failed, rerun=rerun
        )
        if not again:
            echo(f"run {run_id} has no failed jobs to retry", err=True)
            return
        uploads = sum(1 for j in again if j.state.value == "finished")
        only = f", {uploads} of them only to upload again" if uploads else ""
        echo(f"run {run_id}: retrying {len(again)} job(s){only}", err=True)
        run = opened.ledger.run(run_id)
        report = passes.one_pass(opened, run, on_event=say(settings.quiet))
    if settings.json:
        emit_json({"run": run_id, "counts": report.counts, "retried": [j.address for j in again]})
