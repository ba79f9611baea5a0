"""``submit``, ``jobs`` and ``cancel``: single jobs on the profile's scheduler."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import HpcBridgeError, PartialFailure, SchedulerError
from ..schedulers.base import Scheduler, State
from . import hints
from .app import main, settings_of
from .handles import adopt_run_profile, host_key_option, session, take_run_lock
from .output import echo, emit_json, emit_table, warn
from .params import seconds_option

if TYPE_CHECKING:  # imported when a command runs, to start fast
    from ..jobstore import Job
    from ..runs import RunSession

F = TypeVar("F", bound=Callable[..., Any])

_COLUMNS = [
    ("id", "ID"),
    ("name", "NAME"),
    ("state", "STATE"),
    ("exit_code", "EXIT"),
    ("submitted", "SUBMITTED"),
    ("end", "ENDED"),
    ("reason", "REASON"),
]


def _rows(jobs: list[Job]) -> list[dict[str, Any]]:
    return [
        {
            "id": j.native_id,
            "name": j.name,
            "state": j.state + (f" ({j.raw_state})" if j.raw_state and not j.final else ""),
            "exit_code": "" if j.exit_code is None else j.exit_code,
            "submitted": j.submitted,
            "end": j.end or "",
            "reason": j.reason,
        }
        for j in jobs
    ]


def _show(jobs: list[Job], *, json_output: bool) -> None:
    if json_output:
        emit_json([j.to_json() for j in jobs])
        return
    if not jobs:
        echo("no jobs", err=True)
        return
    emit_table(_rows(jobs), _COLUMNS)
    for job in jobs:
        if job.state == State.FAILED.value and job.log_tail:
            echo(err=True)
            echo(f"--- job {job.native_id} ({job.name}) failed; last lines of its log:", err=True)
            echo(job.log_tail, err=True, multiline=True)


def _progress(quiet: bool) -> Callable[[Any], None]:
    def on_poll(report: Any) -> None:
        if quiet:
            return
        for job in report.changed:
            extra = (
                f", exit code {job.exit_code}" if job.final and job.exit_code is not None else ""
            )
            # Why it failed or was cancelled, e.g. "killed: walltime 00:20:00 exceeded; raise
            # walltime ...": the exit code alone (143) does not say the scheduler killed it.
            if job.final and job.state != State.FINISHED.value and job.reason:
                extra += f" ({job.reason})"
            echo(f"job {job.native_id} ({job.name}): {job.state}{extra}", err=True)
        if report.error is not None:
            warn(f"poll failed, will retry: {hints.line(report.error)}")

    return on_poll


def _wait_for(opened: Any, ids: list[str], interval: float | None, timeout: float | None) -> None:
    """Poll until the jobs end and show them; PartialFailure when any did not finish well."""
    from ..jobs import wait_for

    settings = opened.settings
    every = interval or settings.poll_interval
    on_poll = _progress(settings.quiet)
    jobs = wait_for(
        opened.store, opened.scheduler, ids, interval=every, timeout=timeout, on_poll=on_poll
    )
    _show(jobs, json_output=settings.json)
    bad = [j for j in jobs if j.state != State.FINISHED.value]
    if bad:
        raise PartialFailure(
            f"{len(bad)} of {len(jobs)} job(s) did not finish successfully: "
            + ", ".join(f"{j.native_id} {j.state}" for j in bad)
        )


def _wait_options(func: F) -> F:
    func = seconds_option(
        "--timeout", "With --wait: give up waiting after this long (the jobs keep running)."
    )(func)
    return seconds_option(
        "--interval",
        "With --wait: seconds between polls, growing while nothing changes "
        "[default: the profile's poll_interval, 30].",
    )(func)


@main.command("submit", short_help="Submit a job script; print its job id.")
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--after",
    "after",
    multiple=True,
    metavar="JOBID",
    help="Start only after this job ended successfully (afterok); repeat for several.",
)
@click.option("--array", metavar="RANGE", help="Submit an array job, e.g. 1-10 or 1,3,5.")
@click.option(
    "--work",
    metavar="DIR",
    help="For a script not rendered by hpcbridge: the absolute folder on the login node to "
    "copy it into and submit it from.",
)
@click.option("--wait", is_flag=True, help="Wait until the job ends; exit 3 if it failed.")
@_wait_options
@host_key_option
@click.pass_context
def submit_command(
    ctx: click.Context,
    script: Path,
    after: tuple[str, ...],
    array: str | None,
    work: str | None,
    wait: bool,
    interval: float | None,
    timeout: float | None,
    accept_new_host_key: bool,
) -> None:
    """Submit a job script to the profile's scheduler and print its job id.

    The script (usually from `hpcbridge render`) is copied into its work folder on the login
    node (over SSH when the profile sets `host`) and submitted with qsub, sbatch or the local
    scheduler. The job's outcome is read later from the status file the script writes.

    \b
    Examples:
      hpcbridge render dcm2niix --input /scratch/in --output /scratch/out -o job.sh
      JOB=$(hpcbridge submit job.sh)
      hpcbridge submit stage-out.sh --after "$JOB"
      hpcbridge --profile artemis submit job.sh --wait
    """
    from ..jobs import submit_script

    settings = settings_of(ctx)
    with session(ctx, accept_new_host_key, xnat=False, ledger=False) as opened:
        job = submit_script(
            opened.store,
            opened.scheduler,
            script,
            after=after,
            array=array,
            work=work,
            host=settings.host or "",
        )
        if not wait:
            if settings.json:
                emit_json(job.to_json())
            else:
                echo(job.native_id)
            return
        if not settings.quiet:
            echo(f"submitted job {job.native_id}; waiting for it to end", err=True)
        _wait_for(opened, [job.native_id], interval, timeout)


#: Without --all, `jobs` shows the jobs that ended within this many seconds.
RECENT = 24 * 3600


@main.command("jobs", short_help="States and exit codes of submitted jobs.")
@click.argument("ids", nargs=-1, metavar="[JOBID]...")
@click.option("--all", "show_all", is_flag=True, help="Include every job this profile submitted.")
@click.option("--wait", is_flag=True, help="Poll until the jobs end; exit 3 if any failed.")
@_wait_options
@host_key_option
@click.pass_context
def jobs_command(
    ctx: click.Context,
    ids: tuple[str, ...],
    show_all: bool,
    wait: bool,
    interval: float | None,
    timeout: float | None,
    accept_new_host_key: bool,
) -> None:
    """Show the state and exit code of submitted jobs, after one poll of the scheduler.

    Without JOBID: the jobs still queued or running and those that ended in the last day
    (`--all` for every job this profile submitted). All live jobs are polled with one
    scheduler call; a job's outcome comes from the status file its script wrote, and a failed
    job shows the last lines of its log.

    \b
    Examples:
      hpcbridge jobs
      hpcbridge jobs 4242 4243 --wait
      hpcbridge --json jobs --all
    """
    from ..jobs import refresh

    settings = settings_of(ctx)
    with session(ctx, accept_new_host_key, xnat=False, ledger=False) as opened:
        store, scheduler = opened.store, opened.scheduler
        wanted = scheduler.check_ids(ids)
        if wanted:
            records = {i: store.get(i) for i in wanted}
            unknown = [i for i, job in records.items() if job is None]
            if unknown:
                _untracked(scheduler, unknown)
            jobs = [j for j in records.values() if j is not None]
        else:
            # Ended records older than a day are not shown without --all: not read either.
            jobs = store.all(ended_since=None if show_all else time.time() - RECENT)
        if wait:
            _wait_for(opened, [j.native_id for j in jobs], interval, timeout)
            return
        report = refresh(store, scheduler, jobs)
        jobs = report.jobs if wanted or show_all else [j for j in report.jobs if _recent(j)]
        _show(jobs, json_output=settings.json)
        if report.error is not None:
            raise SchedulerError(
                f"could not poll the scheduler: {report.error.message}",
                hint="the states shown are the last known ones",
            )


def _recent(job: Job) -> bool:
    from datetime import datetime, timedelta, timezone

    from ..units import parse_utc_stamp

    if not job.final or not job.end:
        return True
    try:
        ended = parse_utc_stamp(job.end)
    except ValueError:
        return True
    return datetime.now(timezone.utc) - ended < timedelta(seconds=RECENT)


def _untracked(scheduler: Scheduler, ids: list[str]) -> None:
    statuses = scheduler.status(ids)
    missing = [i for i in ids if i not in statuses]
    if missing:
        raise SchedulerError(
            f"unknown job id(s): {', '.join(missing)}: not submitted with this profile and "
            "not known to the scheduler",
            hint="`hpcbridge jobs --all` lists the jobs this profile submitted",
        )
    raise SchedulerError(
        f"job(s) {', '.join(ids)} were not submitted with this profile "
        f"(the scheduler says: {', '.join(f'{i} {s.raw_state}' for i, s in statuses.items())})",
        hint="hpcbridge tracks the jobs it submitted; use qstat/squeue for others",
    )


@main.command("cancel", short_help="Cancel jobs, or a whole run (--run).")
@click.argument("ids", nargs=-1, metavar="JOBID...")
@click.option("--run", "run_id", type=int, metavar="RUN_ID", help="Cancel every job of a run.")
@host_key_option
@click.pass_context
def cancel_command(
    ctx: click.Context, ids: tuple[str, ...], run_id: int | None, accept_new_host_key: bool
) -> None:
    """Cancel jobs (qdel, scancel, or the local scheduler's equivalent), or a whole run.

    With --run, if another hpcbridge is moving the run (a sync, a run --wait), wait up to
    30 s for it, then give up naming it (exit 1).

    \b
    Examples:
      hpcbridge cancel 4242 4243
      hpcbridge cancel --run 12
    """
    from ..jobs import cancel_jobs

    settings = settings_of(ctx)
    if bool(ids) == (run_id is not None):
        raise click.UsageError("give job ids or --run RUN_ID (one of the two)")
    if run_id is not None:
        _cancel_run(ctx, run_id, accept_new_host_key)
        return
    with session(ctx, accept_new_host_key, xnat=False, ledger=False) as opened:
        jobs = cancel_jobs(opened.store, opened.scheduler, ids)
    if settings.json:
        emit_json([j.to_json() for j in jobs])
        return
    for job in jobs:
        echo(f"{job.native_id}: {job.state}")


def _end_chain(
    ctx: click.Context, opened: RunSession, run_id: int, accept_new_host_key: bool
) -> None:
    """Invalidate and remove a cancelled chain's XNAT token now, not at the next sync."""
    from ..runs.sync import one_pass

    try:
        with session(ctx, accept_new_host_key, ledger=False, jobs=False) as xnat:
            opened.client = xnat.client
            one_pass(opened, opened.ledger.run(run_id))
    except HpcBridgeError as exc:
        warn(f"the chain's XNAT token stays until the next sync of run {run_id}: {exc.message}")


def _cancel_run(ctx: click.Context, run_id: int, accept_new_host_key: bool) -> None:
    from .. import runlock
    from ..runs import cancel_run

    adopt_run_profile(ctx, run_id)
    settings = settings_of(ctx)
    with (
        take_run_lock(ctx, run_id, "cancel", wait=runlock.BUSY_WAIT),
        session(ctx, accept_new_host_key, xnat=False) as opened,
    ):
        run = opened.ledger.run(run_id)
        rows = cancel_run(opened.ledger, opened.scheduler, run, opened.store)
        if run.options.get("chain"):
            _end_chain(ctx, opened, run_id, accept_new_host_key)
    if settings.json:
        emit_json({"run": run_id, "cancelled": [r.address for r in rows]})
        return
    echo(f"run {run_id}: cancelled {len(rows)} job(s)")
