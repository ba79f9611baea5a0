"""Scheduler-neutral job states and the status record every scheduler parser returns.

Parsers turn scheduler text into :class:`JobStatus` at the edge, so the orchestration layer never
sees raw scheduler strings (only ``raw_state``, kept for messages and debugging).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from hpcbridge.errors import SchedulerError

__all__ = ["JobStatus", "SchedulerError", "State", "chunk_ids"]


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
    """

    native_id: str
    state: State
    raw_state: str
    exit_code: int | None = None
    name: str = ""
    reason: str = ""
    signal: int | None = None


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
    for job_id in ids:
        extra = len(job_id) + (1 if group else 0)
        if group and size + extra > max_chars:
            yield group
            group, size = [], 0
            extra = len(job_id)
        group.append(job_id)
        size += extra
    if group:
        yield group
