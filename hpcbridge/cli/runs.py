"""``run``, ``status``, ``sync``, ``retry``: one recipe over many scans, recorded in the ledger."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, HpcBridgeError, PartialFailure, RunBusyError
from .app import main, settings_for, settings_of
from .jobs import connected, host_key_option
from .output import echo, emit_json, emit_table, error_line, status_line, warn
from .params import SECONDS
from .recipes import _set_values, recipes_option


def adopt_run_profile(ctx: click.Context, run_id: int | None) -> int:
    """The run to work on; without --profile, its own profile's settings are used from here on.

    A run started with `--profile artemis` must be synced against the same XNAT and cluster,
    also from a cron line that does not repeat the profile.
    """
    import os

    from ..ledger import Ledger

    settings = settings_of(ctx)
    with Ledger.for_settings(settings) as ledger:
        run = _run_of(ledger, settings, run_id)
    root = ctx.find_root()
    explicit = root.params.get("profile") or os.environ.get("HPCBRIDGE_PROFILE")
    if not explicit and run.profile != settings.profile:
        root.meta["settings"] = settings_for(ctx, run.profile)
    return int(run.id)


def _profile_given(ctx: click.Context) -> bool:
    import os

    return bool(ctx.find_root().params.get("profile") or os.environ.get("HPCBRIDGE_PROFILE"))


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


def _skipped(exc: RunBusyError) -> dict[str, Any]:
    # Not an error: a cron pass that finds another pass at work has nothing to do.
    echo(f"{exc.message}; skipped", err=True)
    return {"run": exc.run_id, "busy": exc.holder.to_json()}


def _checked(lock: Any, on_pass: Any) -> Any:
    """``on_pass`` that first makes sure the lock is still ours: a waiting loop that lost it
    (stopped longer than the stale limit) must not go on beside the process that took it."""

    def check(report: Any) -> None:
        lock.check()
        on_pass(report)

    return check


@contextlib.contextmanager
def _opened(ctx: click.Context, accept_new_host_key: bool = False) -> Iterator[dict[str, Any]]:
    """The ledger, the XNAT client, the transport and the scheduler, each opened once."""
    from ..ledger import Ledger
    from ..xnat import connect

    settings = settings_of(ctx)
    with contextlib.ExitStack() as stack:
        ledger = stack.enter_context(Ledger.for_settings(settings))
        client = stack.enter_context(connect(settings))
        store, scheduler = stack.enter_context(connected(ctx, accept_new_host_key))
        yield {
            "settings": settings,
            "ledger": ledger,
            "client": client,
            "scheduler": scheduler,
            "store": store,
        }


def _run_of(ledger: Any, settings: Any, run_id: int | None) -> Any:
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


def _say(quiet: bool) -> Any:
    def say(text: str) -> None:
        if not quiet:
            echo(f"  {text}", err=True)

    return say


class _Progress:
    """Counts per state, rate and ETA on one stderr line per pass (or in place on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, report: Any) -> None:
        _warn(report)  # also with --quiet: a cron job's mail should carry them
        if self.quiet:
            return
        counts = report.counts
        total = sum(counts.values())
        ended = sum(counts.get(s, 0) for s in ("uploaded", "failed", "cancelled"))
        elapsed = time.monotonic() - self.start
        parts = [f"{k} {v}" for k, v in counts.items() if v]
        line = f"run {report.run.id}: {ended}/{total} ended ({', '.join(parts)})"
        if 0 < ended < total and elapsed > 0:
            rate = ended / elapsed
            line += f", {rate * 60:.1f}/min, ETA {int((total - ended) / rate)} s"
        status_line(line, in_place=self.tty)

    def close(self) -> None:
        if self.tty and not self.quiet:
            echo(err=True)


def _warn(report: Any) -> None:
    for error in report.errors:
        warn(error)


def _finish(report: Any) -> None:
    failed = report.counts.get("failed", 0) + report.counts.get("cancelled", 0)
    if report.done and failed:
        raise PartialFailure(
            f"run {report.run.id} ended with {failed} of {sum(report.counts.values())} "
            "scan(s) failed or cancelled",
            hint=f"`hpcbridge status {report.run.id}` shows why; "
            f"`hpcbridge retry {report.run.id}` tries them again",
        )


@main.command("run")
@click.argument("recipe")
@click.argument("address")
@click.option("--scan", "scan_ids", multiple=True, metavar="ID", help="Only this scan ID.")
@click.option(
    "--scan-type", "scan_types", multiple=True, metavar="GLOB", help="Only scans of this type."
)
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Recipe parameter.")
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    metavar="N",
    help="At most N jobs in the scheduler at once [default: the profile's max_queued, 50].",
)
@click.option("--force", is_flag=True, help="Also redo scans already converted the same way.")
@click.option(
    "--chain",
    is_flag=True,
    help="Per scan, submit stage-in -> compute -> stage-out as dependent jobs that do the "
    "transfers on the cluster (profile keys: transfer_queue, required on PBS and Torque, "
    "transfer_walltime, bridge_command).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and one job script; change nothing.")
@click.option("--wait", is_flag=True, help="Keep syncing until the run ends, with progress.")
@click.option(
    "--interval",
    type=SECONDS,
    metavar="SECONDS",
    help="With --wait: seconds between passes [default: the profile's poll_interval].",
)
@recipes_option
@host_key_option
@click.pass_context
def run_command(
    ctx: click.Context,
    recipe: str,
    address: str,
    scan_ids: tuple[str, ...],
    scan_types: tuple[str, ...],
    sets: tuple[str, ...],
    max_queued: int | None,
    force: bool,
    chain: bool,
    dry_run: bool,
    wait: bool,
    interval: float | None,
    recipe_dirs: tuple[Path, ...],
    accept_new_host_key: bool,
) -> None:
    """Run a recipe over every matching scan: stage in, submit, and (with sync) stage out.

    Scans already converted by the same recipe with the same parameters are skipped. The run
    is recorded in the ledger; print its id, then follow it with `hpcbridge status` and move
    it on with `hpcbridge sync` (from cron, or with --wait here).

    \b
    Examples:
      hpcbridge run dcm2niix PTV000 --scan-type '*T1*' --dry-run
      hpcbridge run dcm2niix PTV000 --scan-type '*T1*' --max-queued 20
      hpcbridge --profile sandbox run dcm2niix PTV000/Haofei01/Haofei01_MR1 --wait
      hpcbridge --profile artemis run dcm2niix PTV000 --scan-type '*T1*' --chain
    """
    from ..runner import RunRequest, start_run, sync, wait_run

    request = RunRequest(
        recipe=recipe,
        address=address,
        scan_ids=scan_ids,
        scan_types=scan_types,
        sets=_set_values(sets),
        max_queued=max_queued,
        force=force,
        recipe_dirs=recipe_dirs,
        chain=chain,
    )
    if chain:
        from ..chain import transfer_queue

        # Refused before the ledger, XNAT or the cluster is even opened: nothing changes.
        transfer_queue(settings_of(ctx))
    if dry_run:
        _dry_run(ctx, request)
        return
    with _opened(ctx, accept_new_host_key) as o:
        settings = o["settings"]
        plan = start_run(settings, o["client"], o["ledger"], request)
        for ref, why in plan.skipped:
            if not settings.quiet:
                echo(f"  {ref.address}: skipped, {why}", err=True)
        if plan.run is None:
            echo("nothing to do: every matching scan is converted already", err=True)
            return
        if not settings.quiet:
            echo(
                f"resuming run {plan.run.id} (started {plan.run.created} with the same "
                "arguments, not ended yet)"
                if plan.resumed
                else f"run {plan.run.id}: {len(plan.scans)} scan(s) planned",
                err=True,
            )
        say = _say(settings.quiet)
        args = (settings, o["client"], o["ledger"], o["scheduler"], plan.run)
        command = "run --wait" if wait else "run"
        try:
            # --wait outlasts a cron pass that got in first: wait for it rather than give up.
            lock = take_run_lock(ctx, plan.run.id, command, wait=None if wait else 0)
        except RunBusyError as exc:
            busy = _skipped(exc)
            if settings.json:
                emit_json(busy)
            else:
                echo(plan.run.id)
            return
        with lock:
            if wait:
                progress = _Progress(settings.quiet)
                report = wait_run(
                    *args,
                    interval=interval or settings.poll_interval,
                    on_pass=_checked(lock, progress),
                    on_event=say,
                    store=o["store"],
                )
                progress.close()
            else:
                report = sync(*args, on_event=say, store=o["store"])
                _warn(report)
    if settings.json:
        emit_json({"run": plan.run.id, "counts": report.counts, "state": report.run.state.value})
    else:
        echo(plan.run.id)
    _finish(report)


def _dry_run(ctx: click.Context, request: Any) -> None:
    """Plan against XNAT (read-only) and print; no ledger, no files, no jobs."""
    from ..ledger import Ledger, ledger_path
    from ..runner import dry_run_scripts, start_run
    from ..xnat import connect

    settings = settings_of(ctx)
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(connect(settings))
        # Read the ledger to skip converted scans, but never create it: a dry run changes nothing.
        ledger = None
        if ledger_path(settings).exists():
            ledger = stack.enter_context(Ledger.for_settings(settings))
        plan = start_run(settings, client, ledger, request, dry_run=True)
    kind = settings.scheduler
    rows = [{"scan": r.address, "type": r.type, "action": "convert"} for r in plan.scans]
    rows += [{"scan": r.address, "type": r.type, "action": why} for r, why in plan.skipped]
    if settings.json:
        emit_json({"recipe": plan.recipe.name, "parameters": plan.values, "scans": rows})
        return
    emit_table(rows, [("scan", "SCAN"), ("type", "TYPE"), ("action", "ACTION")])
    echo(err=True)
    echo(
        f"{len(plan.scans)} scan(s) would be converted with {plan.recipe.name} on the {kind} "
        "scheduler; nothing was changed.",
        err=True,
    )
    if plan.scans:
        scripts = dry_run_scripts(settings, plan, chain_steps=request.chain)
        titles = ["stage-in job", "compute job", "stage-out job"] if request.chain else ["job"]
        for title, script in zip(titles, scripts, strict=True):
            echo(err=True)
            echo(f"# {title} script for {plan.scans[0].address}:", err=True)
            echo(script, multiline=True)


_STATUS_COLUMNS = [
    ("scan", "SCAN"),
    ("state", "STATE"),
    ("job", "JOB"),
    ("submitted", "SUBMITTED"),
    ("ended", "ENDED"),
    ("exit", "EXIT"),
    ("output", "OUTPUT"),
]


@main.command("status")
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
    from ..runner import describe_wait, waiting

    settings = settings_of(ctx)
    with Ledger.for_settings(settings) as ledger:
        run = _run_of(ledger, settings, run_id)
        jobs = ledger.jobs(run.id)
        counts = ledger.counts(run.id)
    if settings.json:
        emit_json(
            {
                "run": {
                    "id": run.id,
                    "recipe": run.recipe,
                    "parameters": run.params,
                    "target": run.target,
                    "state": run.state.value,
                    "created": run.created,
                },
                "counts": counts,
                "jobs": [_job_json(j) for j in jobs],
            }
        )
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


def _job_json(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
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


def _waiting_json(job: Any) -> dict[str, Any] | None:
    """What a scan waits for: XNAT or the cluster away (``for``), or a second try of a step
    that failed once (``for`` null); since when, how many tries, when the next is."""
    from ..runner import waiting

    record = waiting(job)
    if record is None:
        return None
    keys = ("for", "step", "since", "tries", "next", "error", "retry_after")
    return {k: record.get(k) for k in keys}


@main.command("sync")
@click.argument("run_id", required=False, type=int)
@click.option("--watch", is_flag=True, help="Keep syncing until the run (or every run) ends.")
@click.option(
    "--interval",
    type=SECONDS,
    metavar="SECONDS",
    help="With --watch: seconds between passes [default: the profile's poll_interval].",
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
) -> tuple[dict[str, Any], Any]:
    """One run's pass (or passes, ``watch``) under its lock: its JSON summary and report, or
    the busy line's JSON and None when another process holds the run."""
    from ..runner import sync, wait_run

    command = "sync --watch" if watch else "sync"
    try:
        lock = take_run_lock(ctx, run_id, command, wait=None if wait else 0)
    except RunBusyError as exc:
        if tell_busy:
            return _skipped(exc), None
        return {"run": exc.run_id, "busy": exc.holder.to_json()}, None
    # The lock before XNAT: a skipped pass logs in nowhere.
    with lock, _opened(ctx, accept) as o:
        settings = o["settings"]
        run = o["ledger"].run(run_id)
        args = (settings, o["client"], o["ledger"], o["scheduler"], run)
        say = _say(settings.quiet)
        progress = _Progress(settings.quiet)
        if watch:
            report = wait_run(
                *args,
                interval=interval or settings.poll_interval,
                on_pass=_checked(lock, progress),
                on_event=say,
                store=o["store"],
            )
        else:
            report = sync(*args, on_event=say, store=o["store"])
            progress(report)
        progress.close()
    return {"run": run.id, "counts": report.counts, "state": report.run.state.value}, report


def _sync_active(ctx: click.Context, watch: bool, interval: float | None, accept: bool) -> None:
    """A pass over every active run, each under its own lock and with its own profile; with
    ``watch``, passes until none is left. One run's error or busy lock does not stop the others.

    Exit code: 1 if any run's pass failed (2 if every failure was the configuration's), else 3
    if a run ended with scans failed or cancelled, else 0.
    """
    from ..ledger import Ledger, RunState

    root = ctx.find_root()
    base = settings_of(ctx)
    given = _profile_given(ctx)
    results: dict[int, dict[str, Any]] = {}
    errors: list[int] = []
    partial = False
    out: set[int] = set()  # runs that failed during --watch: not tried again
    told: set[int] = set()  # runs whose busy line is printed already
    first = True
    while True:
        with Ledger.for_settings(base) as ledger:
            runs = ledger.runs(base.profile if given else None)
        if first and not runs:
            raise ConfigError(
                f"no runs yet for profile {base.profile!r}",
                hint="start one with `hpcbridge run RECIPE ADDRESS`",
            )
        active = [r for r in runs if r.state is RunState.ACTIVE and r.id not in out]
        if first and not active and not base.quiet:
            echo("no active runs: nothing to sync", err=True)
        if not active:
            break
        for run in active:
            try:
                if not given and run.profile != base.profile:
                    root.meta["settings"] = settings_for(ctx, run.profile)
                data, report = _sync_run(
                    ctx, run.id, watch=False, interval=None, accept=accept, wait=False,
                    tell_busy=run.id not in told,
                )  # fmt: skip
                results[run.id] = data
                if report is None:
                    told.add(run.id)
                else:
                    _finish(report)
            except PartialFailure as exc:
                partial = True
                error_line(exc.message, exc.hint)
            except HpcBridgeError as exc:
                errors.append(exc.exit_code)
                out.add(run.id)
                prefix = "" if exc.message.startswith(f"run {run.id}") else f"run {run.id}: "
                error_line(prefix + exc.message, exc.hint)
            finally:
                root.meta["settings"] = base
        first = False
        if not watch:
            break
        time.sleep(interval or base.poll_interval)
    if base.json:
        emit_json(list(results.values()))
    if errors:
        ctx.exit(2 if all(code == 2 for code in errors) else 1)
    if partial:
        ctx.exit(3)


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
    from ..runner import retry_run, sync

    adopt_run_profile(ctx, run_id)
    lock = take_run_lock(ctx, run_id, "retry", wait=runlock.BUSY_WAIT)
    with lock, _opened(ctx, accept_new_host_key) as o:
        settings = o["settings"]
        run = o["ledger"].run(run_id)
        again = retry_run(
            o["ledger"], run, include_cancelled=cancelled and not only_failed, rerun=rerun
        )
        if not again:
            echo(f"run {run_id} has no failed jobs to retry", err=True)
            return
        uploads = sum(1 for j in again if j.state.value == "finished")
        only = f", {uploads} of them only to upload again" if uploads else ""
        echo(f"run {run_id}: retrying {len(again)} job(s){only}", err=True)
        report = sync(
            settings, o["client"], o["ledger"], o["scheduler"], o["ledger"].run(run_id),
            on_event=_say(settings.quiet),
        )  # fmt: skip
    if settings.json:
        emit_json({"run": run_id, "counts": report.counts, "retried": [j.address for j in again]})


#: Without --all or --limit, `runs` shows this many of the newest runs.
RUNS_SHOWN = 20

_RUNS_COLUMNS = [
    ("id", "RUN"),
    ("recipe", "RECIPE"),
    ("target", "TARGET"),
    ("profile", "PROFILE"),
    ("state", "STATE"),
    ("jobs", "JOBS"),
    ("created", "CREATED"),
    ("last", "LAST ACTIVITY"),
]


@main.command("runs")
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
    profile = settings.profile if _profile_given(ctx) else None
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
    emit_table(
        [
            {
                "id": run.id,
                "recipe": run.recipe,
                "target": run.target,
                "profile": run.profile,
                "state": run.state.value,
                "jobs": ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "no jobs",
                "created": run.created,
                "last": last,
            }
            for run, counts, last in rows
        ],
        _RUNS_COLUMNS,
    )
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
