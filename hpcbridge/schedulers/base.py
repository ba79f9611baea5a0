"""Scheduler-neutral job states and the status record every scheduler parser returns.

Parsers turn scheduler text into :class:`JobStatus` at the edge, so the orchestration layer never
sees raw scheduler strings (only ``raw_state``, kept for messages and debugging).
"""

from __future__ import annotations

import signal as _signal
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.script import ScriptInfo

if TYPE_CHECKING:
    from hpcbridge.transport import Transport

__all__ = [
    "KILL_CAUSES",
    "JobStatus",
    "Scheduler",
    "SchedulerError",
    "State",
    "chunk_ids",
    "explain_kill",
    "merge_array",
]


class State(str, Enum):
    """Where a job is in its life, the same for every scheduler."""

    QUEUED = "queued"
    HELD = "held"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        """True once the scheduler will not change the state any more."""
        return self in (State.FINISHED, State.FAILED, State.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    """One job's status as a scheduler reported it.

    ``exit_code`` is None when the scheduler did not show one; a FINISHED job with no exit code
    may still have failed (PBS ``C``/``F`` states), and the job's own exit-code file decides.
    ``signal`` is the signal number that killed the job, when the scheduler says so.
    ``killed_by`` names what the scheduler killed the job for (a key of :data:`KILL_CAUSES`, or
    "signal" with ``signal`` set), and ``limit`` the limit it exceeded as the scheduler wrote
    it ("00:20:00", "1gb"), when known: the job's own status file only sees the SIGTERM (143),
    so these are the only record of why. :func:`explain_kill` makes the sentence.
    """

    native_id: str
    state: State
    raw_state: str
    exit_code: int | None = None
    name: str = ""
    reason: str = ""
    signal: int | None = None
    killed_by: str | None = None
    limit: str | None = None


# What each cause is called in a message, and what the user can raise about it. The recipe's
# [resources] table is the one place an hpcbridge user sets limits (`run` has no --walltime);
# a hand-written script sets them in its own directives. cput and vmem limits usually come from
# the queue rather than the job's request, so their hint says so.
_RAISE = "in the recipe's [resources] or the job script's directives"
KILL_CAUSES: dict[str, tuple[str, str]] = {
    "walltime": ("walltime", f"raise walltime {_RAISE}"),
    "memory": ("memory", f"raise memory {_RAISE}"),
    "vmem": ("virtual memory (vmem)", f"raise memory {_RAISE}; a vmem limit may be the queue's"),
    "cput": ("CPU time (cput)", "use a queue with a larger cput limit, or fewer CPU-hours"),
    "ncpus": ("CPU use (ncpus)", f"raise cpus {_RAISE}, or make the job start fewer threads"),
}


def _signal_name(number: int) -> str:
    try:
        return _signal.Signals(number).name
    except ValueError:
        return ""


def explain_kill(status: JobStatus | None) -> str:
    """One sentence saying why the scheduler killed the job, with what to raise; "" if it did
    not say it killed it.

    ``killed: walltime 00:20:00 exceeded; raise walltime in the recipe's [resources] ...`` or
    ``killed by signal 15 (SIGTERM)``. Every command that shows a job's reason uses this, so
    ``jobs``, ``status`` and a run's messages say the same thing.
    """
    if status is None:
        return ""
    if status.killed_by in KILL_CAUSES:
        what, hint = KILL_CAUSES[status.killed_by]
        limit = f" {status.limit}" if status.limit else ""
        return f"killed: {what}{limit} exceeded; {hint}"
    if status.signal:  # killed_by "signal": the number says which
        name = _signal_name(status.signal)
        return f"killed by signal {status.signal}" + (f" ({name})" if name else "")
    return ""


def chunk_ids(ids: Sequence[str], *, max_chars: int = 4000) -> Iterator[list[str]]:
    """Split ``ids`` into groups whose space-joined length stays under ``max_chars``.

    Status and cancel commands take every id in one call (centres ask for one poll, not one per
    job), but command lines are bounded (ARG_MAX, and sshd/shell limits on remote commands), so
    very long id lists are split. An id longer than ``max_chars`` still gets its own group.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    group: list[str] = []
    size = 0
    for native_id in ids:
        extra = len(native_id) + (1 if group else 0)
        if group and size + extra > max_chars:
            yield group
            group, size = [], 0
            extra = len(native_id)
        group.append(native_id)
        size += extra
    if group:
        yield group


class Scheduler(ABC):
    """Submit, poll and cancel jobs through a transport (this machine or a login node).

    ``status`` makes one scheduler call for all ids (chunked only past the command-line limit)
    and leaves out the ids the scheduler no longer knows; a call that fails raises, so a failed
    poll never changes what the caller believes about a job. ``status_calls`` counts the calls,
    for politeness checks.
    """

    kind: ClassVar[str]

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.status_calls = 0

    @property
    def template(self) -> str:
        """The job-script skeleton for this scheduler (``render_script``'s ``scheduler``)."""
        return self.kind

    def prepare_script(self, text: str) -> str:
        """The script as it should be uploaded; some flavours need directives moved."""
        return text

    def submit(
        self,
        script_path: str,
        *,
        after: Sequence[str] = (),
        array: str | None = None,
        info: ScriptInfo | None = None,
    ) -> str:
        """Submit the script at ``script_path`` (on the transport's side); return the job id."""
        return self._submit(script_path, list(after), array, info or ScriptInfo())

    @abstractmethod
    def _submit(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> str:
        """:meth:`submit` with its defaults filled in."""

    @abstractmethod
    def status(self, ids: Sequence[str]) -> dict[str, JobStatus]:
        """Statuses keyed by the ids asked for; ids the scheduler does not know are absent."""

    @abstractmethod
    def cancel(self, ids: Sequence[str]) -> list[str]:
        """Cancel jobs; return the ids the scheduler did not know."""

    def check_ids(self, ids: Sequence[str]) -> list[str]:
        """The ids, or a SchedulerError naming the ones this scheduler could never have issued."""
        return list(ids)

    @abstractmethod
    def find_jobs(self, *, name: str, work_dir: str | None = None) -> list[str]:
        """Ids of the jobs the scheduler knows by this job name (queued, running or recently
        ended), oldest first: a job submitted just before a crash, looked up before submitting
        it again. A lookup that fails raises, so nothing is submitted twice on a guess."""

    def log_paths(self, native_id: str, info: ScriptInfo) -> tuple[str | None, str | None]:
        """Where the job's stdout and stderr go; the script's directives say, by default."""
        return info.stdout, info.stderr


# When array tasks disagree, the array as a whole is in the liveliest of their states.
_ARRAY_ORDER = (
    State.RUNNING,
    State.QUEUED,
    State.HELD,
    State.UNKNOWN,
    State.FAILED,
    State.CANCELLED,
    State.FINISHED,
)


def merge_array(parent: str, members: Sequence[JobStatus]) -> JobStatus:
    """One status for an array job from its tasks' statuses."""
    state = min((m.state for m in members), key=_ARRAY_ORDER.index)
    first = next(m for m in members if m.state is state)
    failed = [m.exit_code for m in members if m.exit_code not in (None, 0)]
    # The first task the scheduler killed explains the array's failure, whatever the
    # liveliest task is doing.
    killed = next((m for m in members if m.killed_by or m.signal), first)
    return JobStatus(
        native_id=parent,
        state=state,
        raw_state=first.raw_state,
        exit_code=failed[0] if failed else first.exit_code,
        name=first.name,
        reason=first.reason,
        signal=killed.signal,
        killed_by=killed.killed_by,
        limit=killed.limit,
    )
