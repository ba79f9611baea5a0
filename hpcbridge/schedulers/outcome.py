"""How a job ended, decided after each poll: the status file its script writes (exit code and
end time) is the truth; the scheduler's view fills in while the job is alive, when the file is
missing, and for scripts hpcbridge did not render (they write no file).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from hpcbridge.jobstore import Job
from hpcbridge.schedulers.base import JobStatus, State, explain_kill
from hpcbridge.schedulers.local import array_indices
from hpcbridge.transport import Transport
from hpcbridge.units import utc_stamp

__all__ = ["STATUS_FILE_GRACE", "resolve", "resolve_by_scheduler"]

#: How long a job the scheduler calls ended may go without its status file before it is judged
#: by the scheduler alone: network file systems can show the file to the login node late.
STATUS_FILE_GRACE = 30.0
#: A shell's exit code above this is 128 + the signal that ended it (143: SIGTERM).
_SIGNAL_EXIT = 128


def _read_json(transport: Transport, path: str) -> dict[str, Any] | None:
    text = transport.read_text(path, limit=64 * 1024)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None  # being written; the next poll reads it whole
    return data if isinstance(data, dict) else None


def _task_tags(job: Job) -> list[str]:
    """The suffix of each task's state files: ``.3`` for array task 3, none for a plain job."""
    return [f".{i}" for i in array_indices(job.array)] if job.array else [""]


def _started(transport: Transport, job: Job) -> bool:
    return any(
        transport.read_text(f"{job.state_dir}/started{tag}.json", limit=4096) is not None
        for tag in _task_tags(job)
    )


def resolve(job: Job, status: JobStatus | None, transport: Transport) -> Job:
    """The job after this poll: its status file decides, the scheduler fills in."""
    if job.state_dir is None:
        return resolve_by_scheduler(job, status)
    if status is not None and status.state in (State.QUEUED, State.HELD):
        # Not running: its folder holds no outcome of this attempt (a requeued job's is stale),
        # so no file is read for it: over SSH each read is a round trip, per job, per poll.
        return _as_reported(job, status)
    outcomes = [
        _read_json(transport, f"{job.state_dir}/status{tag}.json") for tag in _task_tags(job)
    ]
    if all(outcomes):
        return _recorded(job, status, [o for o in outcomes if o])
    if status is not None and not status.state.is_final:
        return _as_reported(job, status)
    # The scheduler says it ended (or no longer knows it) and there is no status file yet.
    if any(outcomes) or _started(transport, job):
        return _unrecorded(job, status)
    return _never_started(job, status)


def _as_reported(job: Job, status: JobStatus, **changes: Any) -> Job:
    return replace(
        job, state=status.state.value, raw_state=status.raw_state, reason=status.reason, **changes
    )


def _in_grace(job: Job, now: float) -> bool:
    return job.ended_seen is None or now - job.ended_seen < STATUS_FILE_GRACE


def _recorded(job: Job, status: JobStatus | None, outcomes: list[dict[str, Any]]) -> Job:
    """A job whose script (every task of it) recorded how it ended."""
    now = time.time()
    if status is not None and not status.state.is_final and _in_grace(job, now):
        # The script has ended but its job has not: PBS delivers the -o/-e files and says
        # why it killed a job (walltime, memory) only when the job leaves E for F, so the
        # log and the cause are read once the scheduler agrees (or the grace runs out).
        return _as_reported(job, status, ended_seen=job.ended_seen or now)
    bad = [code for o in outcomes if (code := int(o.get("exit_code", 1))) != 0]
    ends = [str(o.get("end", "")) for o in outcomes]
    # Ended by a signal that the scheduler says was a deletion (qdel, scancel from a shell):
    # cancelled, as if hpcbridge had cancelled it, not a failure of the recipe.
    deleted = (
        status is not None
        and status.state is State.CANCELLED
        and bool(bad)
        and all(c > _SIGNAL_EXIT for c in bad)
    )
    state = State.CANCELLED if deleted else State.FAILED if bad else State.FINISHED
    return replace(
        job,
        state=state.value,
        raw_state=status.raw_state if status else job.raw_state,
        exit_code=bad[0] if bad else 0,
        end=max(ends) if ends else utc_stamp(),
        reason=_failure_reason(bad[0], status) if bad else "",
    )


def _never_started(job: Job, status: JobStatus | None) -> Job:
    """Ended, or gone from the scheduler, before its script began."""
    if status is not None and status.state is State.CANCELLED:
        return _cancelled_by_scheduler(job, status)
    if status is not None and status.state is State.FAILED:
        # Failed before its script ran (e.g. the local scheduler's runner died, or PBS could
        # not start it): not a cancel.
        return replace(
            job,
            state=State.FAILED.value,
            raw_state=status.raw_state,
            exit_code=status.exit_code,
            end=utc_stamp(),
            reason=explain_kill(status) or status.reason or "failed before it started",
        )
    return replace(
        job,
        state=State.CANCELLED.value,
        raw_state=status.raw_state if status else "",
        end=utc_stamp(),
        reason="ended before it started (cancelled, or its dependencies failed)",
    )


def _cancelled_by_scheduler(job: Job, status: JobStatus) -> Job:
    return replace(
        job,
        state=State.CANCELLED.value,
        raw_state=status.raw_state,
        end=utc_stamp(),
        # The same words and exit code whether or not its trap had time to write a status
        # file: the trap records 128 + the signal (143 for the SIGTERM of a deletion).
        exit_code=_SIGNAL_EXIT + status.signal if status.signal else job.exit_code,
        reason=_scheduler_cause(status) or status.reason or "cancelled",
    )


def _unrecorded(job: Job, status: JobStatus | None) -> Job:
    """Its script started, and ended without a status file (yet)."""
    if status is not None and status.state is State.CANCELLED:
        return _cancelled_by_scheduler(job, status)
    now = time.time()
    if _in_grace(job, now):
        return replace(job, ended_seen=job.ended_seen or now)
    # Killed too hard for its trap to record anything (SIGKILL): the scheduler may know why.
    return replace(
        job,
        state=State.FAILED.value,
        raw_state=status.raw_state if status else job.raw_state,
        exit_code=status.exit_code if status else None,
        end=utc_stamp(),
        reason=explain_kill(status)
        or "ended without recording an exit code (killed: walltime, memory or node failure?)",
    )


def _failure_reason(exit_code: int, status: JobStatus | None) -> str:
    """Why a job whose status file says ``exit_code`` failed.

    A job the scheduler killed records only the SIGTERM its trap caught (143), so the
    scheduler's cause wins: ``killed: walltime 00:20:00 exceeded; raise walltime ...``. Else
    ``exit code N``, with the scheduler's word on why when a signal ended the job.
    """
    cause = _scheduler_cause(status)
    if cause:
        return cause
    reason = f"exit code {exit_code}"
    if exit_code > 128 and status is not None and status.reason:
        reason += f" ({status.reason})"  # e.g. the local scheduler's "cancelled"
    return reason


def _scheduler_cause(status: JobStatus | None) -> str:
    """What killed the job, as the scheduler tells it; who deleted it first when it was
    deleted ("deleted by alice@login1: killed by signal 15 (SIGTERM)"); "" if nothing did."""
    cause = explain_kill(status)
    if cause and status is not None and status.state is State.CANCELLED and status.reason:
        return f"{status.reason}: {cause}"
    return cause


def resolve_by_scheduler(job: Job, status: JobStatus | None) -> Job:
    """A script hpcbridge did not render writes no status file: the scheduler is all we have."""
    if status is None:
        return replace(
            job,
            state=State.UNKNOWN.value,
            raw_state="",
            reason="the scheduler no longer knows this job and its script records no outcome",
        )
    state = status.state
    if state is State.FINISHED and status.exit_code not in (None, 0):
        state = State.FAILED
    reason = status.reason
    if state.is_final:
        # The scheduler's cause of death before its comment ("Job run at ... and failed").
        cause = _scheduler_cause(status)
        if cause:
            reason = cause
        elif state is State.FAILED and status.exit_code and not reason:
            reason = f"exit code {status.exit_code}"
    return replace(
        job,
        state=state.value,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        reason=reason,
        end=utc_stamp() if state.is_final else None,
    )
