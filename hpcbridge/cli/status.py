"""``status`` and ``runs``: what the ledger says of a run's scans, and of the runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .app import main, settings_of
from .handles import profile_given, run_of
from .output import echo, emit_json, emit_table

if TYPE_CHECKING:  # imported when a command runs, to start fast
    from ..ledger import JobRow

_STATUS_KEYS = ("scan", "state", "job", "submitted", "ended", "exit", "output")
_STATUS_COLUMNS = [(k, k.upper()) for k in _STATUS_KEYS]


@main.command("status", short_help="A run's scans, their states and a summary.")
@click.argument("run_id", required=False, type=int)
@click.pass_context
def status_command(ctx: click.Context, run_id: int | None) -> None:
    """One line per scan of a run (default: the latest), and a summary of counts.

    This reads the ledger only; `hpcbridge sync` asks the scheduler and moves the run on.

    \b
    Examples:
      hpcbridge status
      hpcbridge --json status 12
    """
    from ..ledger import Ledger
    from ..runs import describe_wait, waiting

    settings = settings_of(ctx)
    with Ledger.for_settings(settings) as ledger:
        run = run_of(ledger, settings, run_id)
        jobs = ledger.jobs(run.id)
        counts = ledger.counts(run.id)
    if settings.json:
        keys = ("id", "recipe", "parameters", "target", "state", "created")
        about = {k: v for k, v in _run_json(run, counts, "").items() if k in keys}
        emit_json({"run": about, "counts": counts, "jobs": [_job_json(j) for j in jobs]})
        return
    echo(f"run {run.id}: {run.recipe} over {run.target} ({run.state.value}, {run.created})")
    rows = [
        {
            "scan": j.address,
            "state": j.state.value + (", waiting" if waiting(j) else ""),
            "job": j.native_id or "",
            "submitted": j.submitted_at or "",
            "ended": j.ended_at or "",
            "exit": "" if j.exit_code is None else j.exit_code,
            "output": ", ".join(sorted({u["resource"] for u in j.uploaded})),
        }
        for j in jobs
    ]
    emit_table(rows, _STATUS_COLUMNS)
    echo(", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no jobs")
    for job in jobs:
        if job.state.value in ("failed", "cancelled") and (job.last_error or job.log_tail):
            echo(err=True)
            echo(f"--- {job.address}: {job.last_error}", err=True)
            if job.log_tail:
                echo(job.log_tail, err=True, multiline=True)
        record = waiting(job)
        if record:
            echo(err=True)
            echo(f"--- {job.address}: {describe_wait(record)}: {record.get('error')}", err=True)


def _job_json(job: JobRow) -> dict[str, Any]:
    return {
        "id": job.job_id,
        "name": job.name,
        "scan": job.address,
        "scan_type": job.scan_type,
        "state": job.state.value,
        "raw_state": job.raw_state,
        "job_id": job.native_id,
        "work_dir": job.work_dir,
        "exit_code": job.exit_code,
        "submitted": job.submitted_at,
        "started": job.started_at,
        "ended": job.ended_at,
        "attempts": job.attempts,
        "error": job.last_error,
        "log_tail": job.log_tail,
        "uploaded": job.uploaded,
        "waiting": _waiting_json(job),
    }


def _waiting_json(job: JobRow) -> dict[str, Any] | None:
    """What a scan waits for: XNAT or the cluster away (``for``), or a second try of a step
    that failed once (``for`` null); since when, how many tries, when the next is."""
    from ..runs import waiting

    record = waiting(job)
    if record is None:
        return None
    keys = ("for", "step", "since", "tries", "next", "error", "retry_after")
    return {k: record.get(k) for k in keys}


#: Without --all or --limit, `runs` shows this many of the newest runs.
RUNS_SHOWN = 20

_RUNS_COLUMNS = (
    [("id", "RUN")]
    + [(k, k.upper()) for k in ("recipe", "target", "profile", "state", "jobs", "created")]
    + [("last_activity", "LAST ACTIVITY")]
)


@main.command("runs", short_help="The runs, newest first, with their states.")
@click.option("--all", "show_all", is_flag=True, help="Every run, not only the newest 20.")
@click.option(
    "--limit", type=click.IntRange(min=1), metavar="N", help="The N newest runs [default: 20]."
)
@click.option("--active", is_flag=True, help="Only the runs that have not ended.")
@click.pass_context
def runs_command(ctx: click.Context, show_all: bool, limit: int | None, active: bool) -> None:
    """List the runs, newest first, with their states and jobs per state.

    Runs of every profile, or of --profile when given. This reads the ledger only.

    \b
    Examples:
      hpcbridge runs
      hpcbridge runs --active
      hpcbridge --json runs --all
    """
    from ..ledger import Ledger, RunState

    settings = settings_of(ctx)
    if show_all and limit is not None:
        raise click.UsageError("give --all or --limit N, not both")
    shown = None if show_all else (limit or RUNS_SHOWN)
    profile = settings.profile if profile_given(ctx) else None
    with Ledger.for_settings(settings) as ledger:
        # One more than shown tells whether some were left out.
        every = ledger.overview(profile, limit=None if active or shown is None else shown + 1)
    if active:
        every = [row for row in every if row[0].state is RunState.ACTIVE]
    rows = every if shown is None else every[:shown]
    if settings.json:
        emit_json([_run_json(run, counts, last) for run, counts, last in rows])
        return
    if not rows:
        echo("no active runs" if active else "no runs yet", err=True)
        return
    jobs = [", ".join(f"{k} {v}" for k, v in c.items() if v) or "no jobs" for _r, c, _l in rows]
    table = [dict(_run_json(*row), jobs=j) for row, j in zip(rows, jobs, strict=True)]
    emit_table(table, _RUNS_COLUMNS)
    if len(every) > len(rows) and not settings.quiet:
        echo(f"the {len(rows)} newest shown; --all for every run", err=True)


def _run_json(run: Any, counts: dict[str, int], last: str) -> dict[str, Any]:
    return {
        "id": run.id,
        "recipe": run.recipe,
        "parameters": run.params,
        "target": run.target,
        "profile": run.profile,
        "state": run.state.value,
        "counts": counts,
        "jobs": sum(counts.values()),
        "created": run.created,
        "last_activity": last,
    }
