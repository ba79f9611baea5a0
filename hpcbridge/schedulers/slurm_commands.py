"""Slurm's commands, pure: argv lists for sbatch/squeue/scancel and parsers for their output.

Nothing here runs a command: :class:`~hpcbridge.schedulers.slurm.SlurmScheduler` hands the argv
to its transport. Every option is passed as ``--name=value`` so each value is exactly one argv
element. Facts come from ``schedulers.md`` and the Slurm man pages (squeue "JOB STATE CODES").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import JobStatus, State
from hpcbridge.schedulers.checks import check_array, check_ids, check_value

log = logging.getLogger(__name__)


# id | state | reason | time limit | memory asked | name; the name goes last because it is
# the only free-text field. The limits are there so a TIMEOUT or OUT_OF_MEMORY job can say
# which limit it exceeded.
SQUEUE_FORMAT = "%i|%T|%r|%l|%m|%j"
_SQUEUE_FIELDS = SQUEUE_FORMAT.count("|") + 1

# The states in which Slurm itself killed the job for a limit, and which limit it was.
_KILLED_BY = {"TIMEOUT": "walltime", "OUT_OF_MEMORY": "memory"}

# Source: squeue(1) "JOB STATE CODES" and schedulers.md. A PENDING job whose afterok parent
# failed stays PENDING (Reason=DependencyNeverSatisfied): it is kept QUEUED with the reason, and
# the orchestration layer decides to cancel it.
STATE_MAP: dict[str, State] = {
    "PENDING": State.QUEUED,
    "CONFIGURING": State.QUEUED,  # nodes allocated, still booting
    "REQUEUED": State.QUEUED,
    "REQUEUE_FED": State.QUEUED,
    "RUNNING": State.RUNNING,
    "COMPLETING": State.RUNNING,  # some processes still ending
    "STAGE_OUT": State.RUNNING,
    "SIGNALING": State.RUNNING,
    "RESIZING": State.RUNNING,
    "SUSPENDED": State.HELD,
    "STOPPED": State.HELD,
    "REQUEUE_HOLD": State.HELD,
    "RESV_DEL_HOLD": State.HELD,
    "COMPLETED": State.FINISHED,
    "FAILED": State.FAILED,
    "TIMEOUT": State.FAILED,
    "OUT_OF_MEMORY": State.FAILED,
    "NODE_FAIL": State.FAILED,
    "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.FAILED,
    "PREEMPTED": State.FAILED,  # not requeued, or it would show REQUEUED
    "SPECIAL_EXIT": State.FAILED,
    "CANCELLED": State.CANCELLED,
    "REVOKED": State.CANCELLED,  # federation: a sibling cluster ran it
}

# Job ids as sbatch prints them and squeue shows them: 123, 123_4, 123_[1-10%2], 123+1 (het).
_JOB_ID = re.compile(r"^\d+(_(\d+|\[[\d,%-]+\]))?(\+\d+)?$")


def check_slurm_ids(ids: Sequence[str]) -> list[str]:
    return check_ids("Slurm", _JOB_ID, ids)


def _check_value(what: str, value: str) -> str:
    return check_value("sbatch", what, value)


def _map_state(raw: str, native_id: str) -> State:
    state = STATE_MAP.get(raw)
    if state is None:
        log.warning("job %s: unknown Slurm state %r; treating it as unknown", native_id, raw)
        return State.UNKNOWN
    return state


def submit_argv(
    script_path: str,
    *,
    after: Sequence[str] = (),
    array: str | None = None,
    partition: str | None = None,
    account: str | None = None,
) -> list[str]:
    """The ``sbatch --parsable`` argv submitting ``script_path``.

    ``--export=ALL`` is explicit so that ``SBATCH_EXPORT`` (a site's or a user's default) does
    not decide what a job inherits: every job gets the environment it was submitted from (its
    PATH finds the tools, as on the local scheduler), which the submission has already cleared
    of secrets (:meth:`~hpcbridge.transport.Transport.without_secrets`). ``NONE`` would swap
    it for the login environment on the compute node, which ``srun`` steps then inherit too.
    """
    argv = ["sbatch", "--parsable", "--export=ALL"]
    if partition is not None:
        argv.append("--partition=" + _check_value("partition", partition))
    if account is not None:
        argv.append("--account=" + _check_value("account", account))
    if after:
        argv.append("--dependency=afterok:" + ":".join(check_slurm_ids(after)))
    if array is not None:
        argv.append("--array=" + check_array("sbatch", array))
    argv.append(script_path)
    return argv


def parse_submit(stdout: str) -> str:
    """The job id ``sbatch --parsable`` printed: ``123`` or ``123;cluster`` gives ``123``."""
    # Job-submit plugins may print notices first; the id is on the last line that fits.
    for line in reversed(stdout.strip().splitlines()):
        match = re.match(r"^(\d+)(;[A-Za-z0-9_.-]+)?$", line.strip())
        if match:
            return match.group(1)
    raise SchedulerError(
        f"sbatch printed no job id: {stdout.strip()[:300]!r}",
        hint="check the submission output above; the job may not have been queued",
    )


def status_argv(ids: Sequence[str]) -> list[str]:
    """One ``squeue`` call for all ``ids``; the format is a single argv element.

    ``-t all`` keeps ended jobs (COMPLETED, FAILED, CANCELLED) in the answer for ``MinJobAge``
    seconds; without it squeue prints nothing for them.
    """
    if not ids:
        raise ValueError("status_argv needs at least one job id (squeue alone lists every job)")
    return ["squeue", "-h", "-t", "all", "-j", ",".join(check_slurm_ids(ids)), "-o", SQUEUE_FORMAT]


def find_argv(name: str) -> list[str]:
    """The ids of the jobs named ``name``, ended ones too (``-t all``), one per line."""
    return ["squeue", "-h", "-t", "all", "-n", _check_value("job name", name), "-o", "%i"]


def parse_found(stdout: str) -> list[str]:
    """Job ids from ``find_argv``'s output; array tasks (``123_4``) as their array (``123``)."""
    found: list[str] = []
    for line in stdout.split():
        native_id = line.split("_", 1)[0]
        if native_id.isdigit() and native_id not in found:
            found.append(native_id)
    return sorted(found, key=int)


def cancel_argv(ids: Sequence[str]) -> list[str]:
    """``scancel`` for all ``ids``."""
    if not ids:
        raise ValueError("cancel_argv needs at least one job id")
    return ["scancel", *check_slurm_ids(ids)]


def _reason(value: str) -> str:
    # Slurm prints the literal "None" when there is no reason.
    return "" if value.strip() in ("", "None", "(null)") else value.strip()


def _limit(killed_by: str | None, time_limit: str, memory: str) -> str | None:
    """The limit a killed job exceeded, as Slurm printed it ("20:00", "2G"); None if unknown."""
    value = {"walltime": time_limit, "memory": memory}.get(killed_by or "", "").strip()
    return None if value in ("", "0", "N/A", "UNLIMITED", "None", "(null)") else value


def parse_squeue(text: str) -> dict[str, JobStatus]:
    """Parse ``squeue -h -o SQUEUE_FORMAT`` lines into statuses keyed by job id.

    Array tasks keep their own ids (``123_4``); a pending array shows as ``123_[5-10]``.
    """
    statuses: dict[str, JobStatus] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", _SQUEUE_FIELDS - 1)
        if len(parts) < _SQUEUE_FIELDS:
            log.warning("ignoring squeue line not in the expected format: %r", line)
            continue
        native_id, raw, why, time_limit, memory, name = (part.strip() for part in parts)
        killed_by = _KILLED_BY.get(raw)
        statuses[native_id] = JobStatus(
            native_id=native_id,
            state=_map_state(raw, native_id),
            raw_state=raw,
            reason=_reason(why),
            name=name,
            killed_by=killed_by,
            limit=_limit(killed_by, time_limit, memory),
        )
    return statuses


def unknown_job(stderr: str, returncode: int) -> bool:
    """True when squeue/scancel failed because Slurm no longer knows the job."""
    return returncode != 0 and "invalid job id" in stderr.lower()


def array_keys(native_id: str) -> list[str]:
    """An array's tasks (``123_4``, a pending ``123_[5-9]``) belong to the array ``123``."""
    return [native_id, native_id.split("_", 1)[0]] if "_" in native_id else [native_id]
