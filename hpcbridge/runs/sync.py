"""The pass over a run, whatever its mode: poll every submitted job with one scheduler call,
stage out and record the jobs that finished, record failures with the end of their logs, and
submit planned jobs until ``max_queued`` are in the scheduler. Every step is a ledger
transition, so a run killed at any moment resumes with the next pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import HpcBridgeError, StageError
from ..jobs import Job, JobStore, next_delay, refresh
from ..ledger import JobRow, JobState, Ledger, Run, RunState
from ..schedulers.base import Scheduler
from ..stageout import RefusedFileError
from ..xnat.client import XnatClient
from .chained import Chained, native_ids
from .context import Mode, Pass, SyncReport, Trouble, due, trouble_of, waiting, without
from .session import RunSession
from .single import SingleJob

Say = Callable[[str], None]


def mode_of(run: Run) -> Mode:
    return Chained() if run.options.get("chain") else SingleJob()


def one_pass(session: RunSession, run: Run, *, on_event: Say | None = None) -> SyncReport:
    """One pass over ``run``: poll, stage out, submit more. Safe to repeat at any time."""
    ctx = Pass(session, run, mode_of(run), on_event)
    ledger = ctx.ledger
    report = SyncReport(run)
    if run.state is RunState.ACTIVE:
        ctx.note_backoff(ledger.jobs(run.id), time.time())
        _poll(ctx, report)
        _stage_out_finished(ctx, report)
        _submit_planned(ctx, report)
        report.errors += _wait_lines(ctx)
    report.counts = ledger.counts(run.id)
    live = sum(report.counts.get(s.value, 0) for s in JobState if not s.final)
    if run.state is RunState.ACTIVE and live == 0:
        ledger.set_run_state(run.id, RunState.DONE)
        ctx.mode.finish(ctx)
    elif run.state is RunState.CANCELLED:
        # Cancelling needs no XNAT, so a cancelled chain's token may still be there.
        ctx.mode.finish(ctx)
    report.run = ledger.run(run.id)
    return report


def watch(
    session: RunSession,
    run: Run,
    *,
    interval: float,
    on_pass: Callable[[SyncReport], None] | None = None,
    on_event: Say | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SyncReport:
    """Passes over ``run`` until it ends, backing off while nothing changes."""
    delay = interval
    while True:
        report = one_pass(session, run, on_event=on_event)
        if on_pass is not None:
            on_pass(report)
        if report.done:
            return report
        run = report.run
        busy = bool(report.submitted or report.uploaded or report.failed)
        delay = next_delay(delay, interval, changed=busy, ceiling=interval * 10)
        sleep(delay)


def _of_handles(passes: Callable[..., SyncReport]) -> Callable[..., SyncReport]:
    def over(
        settings: Settings,
        client: XnatClient,
        ledger: Ledger,
        scheduler: Scheduler,
        run: Run,
        *,
        store: JobStore | None = None,
        **options: Any,
    ) -> SyncReport:
        return passes(RunSession.of(settings, client, ledger, scheduler, store), run, **options)

    return over


#: :func:`one_pass` and :func:`watch` for callers that hold the handles: ``sync(settings,
#: client, ledger, scheduler, run, *, store=None, on_event=None)``, and ``wait_run`` the same
#: with watch's options.
sync = _of_handles(one_pass)
wait_run = _of_handles(watch)


def _wait_lines(ctx: Pass) -> list[str]:
    """One warning per thing away: the scans that wait for it, and its next try."""
    lines = []
    for what, scans in ctx.waits.items():
        record = ctx.down.get(what)
        when = f", next try at {record['next']}" if record else ""
        error = f": {record['error']}" if record else ""
        lines.append(
            f"{len(scans)} scan(s) wait for {what}{when}{error}"
            if len(scans) > 1
            else f"{scans[0]}: waits for {what}{when}{error}"
        )
    return lines


def _poll(ctx: Pass, report: SyncReport) -> None:
    records, polled_rows = _records(ctx, report)
    if not records:
        return
    now = time.time()
    if not any(due(row, now) for row in polled_rows):
        return  # backing off: the scheduler could not be asked a moment ago
    polled = refresh(ctx.store, ctx.scheduler, records)
    if polled.error is not None:
        report.errors.append(f"could not poll the scheduler: {polled.error.message}")
        away = trouble_of(polled.error, ctx.settings.host) or Trouble("the scheduler", True)
        for row in polled_rows:
            ctx.wait(row, "poll", polled.error.message, away)
        return
    by_native = {j.native_id: j for j in polled.jobs}
    for row in polled_rows:
        if waiting(row) is not None:
            row = ctx.ledger.update(row.job_id, extra=without(row.extra, "waiting"))
        ctx.mode.apply(ctx, report, row, by_native)


def _records(ctx: Pass, report: SyncReport) -> tuple[list[Job], list[JobRow]]:
    """The job records of the rows in the scheduler, and those rows; a row whose records are
    missing fails."""
    records: list[Job] = []
    rows: list[JobRow] = []
    for row in ctx.ledger.jobs(ctx.run.id, [JobState.SUBMITTED, JobState.RUNNING]):
        jobs = [ctx.store.get(i) for i in native_ids(row)]
        if not jobs or None in jobs:
            missing = [i for i, j in zip(native_ids(row), jobs, strict=True) if j is None]
            message = (
                f"job {', '.join(missing) or row.native_id} of {row.address} "
                "is not in the job records"
            )
            ctx.ledger.transition(row.job_id, JobState.FAILED, last_error=message)
            report.errors.append(message)
            continue
        records += [j for j in jobs if j is not None]
        rows.append(row)
    return records, rows


def _stage_out_finished(ctx: Pass, report: SyncReport) -> None:
    now = time.time()
    for row in ctx.ledger.jobs(ctx.run.id, [JobState.FINISHED]):
        if not due(row, now):
            continue  # backing off: nothing is asked of XNAT before the time status shows
        needs = ctx.mode.stage_out_needs(ctx)
        if needs in ctx.down:
            found = f"the run's try found {needs} away: {ctx.down[needs]['error']}"
            ctx.wait(row, "upload", found, Trouble(needs, True))
            continue
        try:
            uploaded = ctx.mode.uploaded(ctx, row)
        except HpcBridgeError as exc:
            _stage_out_failed(ctx, report, row, exc)
            continue
        done = ctx.ledger.transition(
            row.job_id,
            JobState.UPLOADED,
            uploaded=uploaded,
            extra=without(row.extra, "waiting", "waited", "stage_out_tries"),
        )
        ctx.say(f"{row.address}: uploaded {len(uploaded)} file(s)")
        ctx.workflow(done)
        report.uploaded.append(ctx.drop_old_outputs(done))


def _stage_out_failed(ctx: Pass, report: SyncReport, row: JobRow, exc: HpcBridgeError) -> None:
    """Wait when the cause passes (XNAT or the cluster away); fail the scan only for a cause
    that retrying will not cure: an output that must not be read (a link, a FIFO) at once, and
    any other error of the upload itself (no outputs, a digest that does not match) when it
    repeats. Uploads are idempotent, so trying again is safe."""
    away = trouble_of(exc, ctx.settings.host)
    if away is not None:
        ctx.wait(row, "upload", exc.message, away)
        return
    first = waiting(row)
    if (
        isinstance(exc, StageError)
        and not isinstance(exc, RefusedFileError)
        and not (first and first.get("check"))
    ):
        record = ctx.wait(row, "upload", exc.message, None)
        report.errors.append(
            f"{row.address}: stage-out failed, will retry once at {record['next']}: {exc.message}"
        )
        return
    # A retry uploads a job's outputs again without computing them again (a chain: submits a
    # stage-out job on its own); but outputs that are not there must be computed again.
    missing = exc.message.startswith("the job wrote no output matching") or exc.message.endswith(
        ": no such folder"
    )
    failed = ctx.ledger.transition(
        row.job_id,
        JobState.FAILED,
        last_error=f"stage-out failed: {exc.message}",
        extra=dict(
            without(row.extra, "waiting", "waited", "stage_out_tries"),
            failed_step=ctx.mode.failed_step(missing),
        ),
    )
    report.failed.append(failed)
    ctx.say(f"{row.address}: failed: stage-out: {exc.message}")
    ctx.workflow(failed)


def _submit_planned(ctx: Pass, report: SyncReport) -> None:
    cap = int(ctx.run.options.get("max_queued") or ctx.settings.max_queued)
    queued = len(ctx.ledger.jobs(ctx.run.id, [JobState.SUBMITTED, JobState.RUNNING]))
    todo = ctx.ledger.jobs(ctx.run.id, [JobState.PLANNED, JobState.STAGED])
    if todo and queued < cap and not ctx.down and not ctx.mode.prepare(ctx, report):
        return
    now = time.time()
    for row in todo:
        if queued >= cap or ctx.down:
            return  # something the submissions need is away: this pass leaves them be
        if due(row, now) and _submit(ctx, report, row):
            queued += 1


def _submit(ctx: Pass, report: SyncReport, row: JobRow) -> bool:
    """Submit one scan; False when it waits or failed instead."""
    try:
        submitted = ctx.mode.submit(ctx, row)
    except HpcBridgeError as exc:
        away = trouble_of(exc, ctx.settings.host)
        if away is not None:
            ctx.wait(row, ctx.mode.wait_step(row), exc.message, away)
            return False
        # Stage-in errors name the scan already; the ledger row and the line name it once.
        reason = exc.message.removeprefix(f"{row.address}: ")
        failed = ctx.ledger.transition(row.job_id, JobState.FAILED, last_error=reason)
        report.failed.append(failed)
        ctx.say(f"{row.address}: failed: {reason}")
        return False
    record = waiting(submitted)
    if record is not None:
        extra = ctx.mode.after_wait(without(submitted.extra, "waiting"), record)
        submitted = ctx.ledger.update(submitted.job_id, extra=extra)
    report.submitted.append(submitted)
    ctx.say(ctx.mode.submitted(submitted))
    return True
