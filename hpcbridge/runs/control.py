"""What a user does to a run besides moving it on: retry what failed, cancel what is left."""

from __future__ import annotations

from ..jobs import JobStore, cancel_jobs
from ..ledger import JobRow, JobState, Ledger, Run, RunState
from ..schedulers.base import Scheduler
from .chained import ChainState, native_ids
from .context import without


def retry_run(
    ledger: Ledger, run: Run, *, include_cancelled: bool = False, rerun: bool = False
) -> list[JobRow]:
    """Redo what failed of failed (and optionally cancelled) jobs; the next sync does it.

    A job that ended well but whose outputs could not be uploaded goes back to ``finished``:
    its outputs are uploaded again, not computed again. A chain whose stage-out job failed
    keeps its stage-in and compute jobs and gets a new stage-out job. Anything else is
    planned again and computed from an empty output folder, as is every job with ``rerun``.
    """
    states = [JobState.FAILED] + ([JobState.CANCELLED] if include_cancelled else [])
    again = []
    for row in ledger.jobs(run.id, states):
        step = row.extra.get("failed_step") if row.state is JobState.FAILED and not rerun else None
        # A chain is submitted whole again unless only its stage-out job failed (its stage-in
        # skips what is staged already).
        chain = ChainState.of(row)
        kept = step == "stage-out" and "compute" in (chain.jobs or {})
        extra = (chain.before("stage-out") if kept else ChainState()).into(
            without(row.extra, "stage_out_tries", "waiting", "failed_step")
        )
        if step == "upload" and row.exit_code == 0:
            again.append(
                ledger.transition(
                    row.job_id, JobState.FINISHED, detail="retry: upload again", extra=extra
                )
            )
            continue
        again.append(ledger.transition(row.job_id, JobState.PLANNED, extra=extra))
    if again and run.state is not RunState.ACTIVE:
        ledger.set_run_state(run.id, RunState.ACTIVE)
    return again


def cancel_run(ledger: Ledger, scheduler: Scheduler, run: Run, store: JobStore) -> list[JobRow]:
    """Cancel every job of the run that has not ended; the run is then cancelled."""
    live = [row for row in ledger.jobs(run.id) if not row.final and row.state != JobState.FINISHED]
    in_scheduler = [i for r in live for i in native_ids(r)]
    if in_scheduler:
        cancel_jobs(store, scheduler, in_scheduler)
    done = [ledger.transition(r.job_id, JobState.CANCELLED, detail="run cancelled") for r in live]
    ledger.set_run_state(run.id, RunState.CANCELLED)
    return done
