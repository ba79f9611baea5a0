"""Passing trouble and the scans that wait it out: which errors pass (XNAT or the cluster away),
how long to back off, and the ``waiting`` record a scan keeps in its ledger row meanwhile."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import Settings
from ..errors import (
    HpcBridgeError,
    SchedulerError,
    TransportError,
    XnatAuthError,
    XnatConnectionError,
    XnatError,
)
from ..ledger import JobRow
from ..units import UTC_STAMP, parse_utc_stamp

#: What a waiting scan waits to do, as ``status`` says it.
WAIT_STEPS = {
    "upload": "upload its outputs",
    "stage-in": "stage its input in",
    "submit": "submit its job",
    "poll": "hear how its job is doing",
}
#: The longest wait a Retry-After may ask for; beyond it the server is not taken at its word.
RETRY_AFTER_LIMIT = 24 * 3600.0
# How qsub and sbatch say that their server cannot be reached now (rather than refusing the job).
_SCHEDULER_AWAY = re.compile(
    r"unable to contact|cannot connect|could not connect|connection refused|timed out|"
    r"try again|temporarily|not responding|communication failure|server is busy",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Trouble:
    """A passing reason why a step could not be done now: it is tried again later, and the scan
    keeps its state. ``whole``: the service as a whole is away (not one request of one scan),
    so the pass stops asking it."""

    what: str
    whole: bool
    retry_after: float | None = None


def trouble_of(exc: HpcBridgeError, host: str | None = None) -> Trouble | None:
    """The passing trouble behind ``exc``, or None when it is a cause that retrying will not
    cure (docs/runs.md has the table)."""
    if isinstance(exc, XnatError):
        after = exc.retry_after
        # An expired session is renewed by the client itself; a login refused after that is
        # the bridge's to fix (`hpcbridge login`), never a reason to fail a scan's work.
        if isinstance(exc, (XnatConnectionError, XnatAuthError)):
            return Trouble("XNAT", True, after)
        if exc.status in (408, 429, 502, 503, 504):
            return Trouble("XNAT", True, after)
        if exc.status is not None and exc.status >= 500:
            return Trouble("XNAT", False, after)
        return None
    if isinstance(exc, TransportError):  # SSH down, a command that could not run or timed out
        return Trouble(host or "the scheduler", True)
    if isinstance(exc, SchedulerError) and _SCHEDULER_AWAY.search(exc.message):
        return Trouble("the scheduler", True)
    return None


def backoff(settings: Settings, tries: int, retry_after: float | None = None) -> float:
    """Seconds to wait after ``tries`` failed tries: ``retry_interval`` doubling up to
    ``retry_max``, or longer when the server asked for longer."""
    delay = min(settings.retry_max, settings.retry_interval * 2 ** max(0, tries - 1))
    if retry_after:
        delay = max(delay, min(retry_after, RETRY_AFTER_LIMIT))
    return delay


def stamp(epoch: float) -> str:
    # Rounded up: a try is never made before the time status showed for it.
    return datetime.fromtimestamp(math.ceil(epoch), tz=timezone.utc).strftime(UTC_STAMP)


def waiting(row: JobRow) -> dict[str, Any] | None:
    """What the scan is waiting for (see :meth:`Pass.wait`), or None."""
    record = row.extra.get("waiting")
    return record if isinstance(record, dict) else None


def due(row: JobRow, now: float) -> bool:
    record = waiting(row)
    if record is None:
        return True
    try:
        return parse_utc_stamp(str(record.get("next"))).timestamp() <= now
    except ValueError:
        return True


def without(extra: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in keys}


def describe_wait(record: dict[str, Any]) -> str:
    """``status``'s words for a waiting record."""
    step = WAIT_STEPS.get(str(record.get("step")), str(record.get("step")))
    if record.get("check"):
        return f"waiting to {step} once more at {record.get('next')} (the first try failed)"
    tries = int(record.get("tries") or 0)
    count = "not tried yet" if not tries else f"{tries} {'try' if tries == 1 else 'tries'}"
    return (
        f"waiting for {record.get('for')} to {step} since {record.get('since')} "
        f"({count}, next try at {record.get('next')})"
    )
