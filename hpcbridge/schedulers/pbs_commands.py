"""PBS's commands, pure: argv lists for qsub/qstat/qdel/qselect, and parsers for what they print
(``qstat -f`` text of any flavour and PBS Pro's JSON, ``qstat --version``, unknown-id errors).

Nothing here runs a command: :class:`~hpcbridge.schedulers.pbs.PbsScheduler` hands the argv to
its transport. The three flavours disagree on flags (``-x`` is job history on PBS Pro and XML on
Torque; the wrappers reject ``-x``, ``-F json`` and ``#PBS -P``), so every builder that depends
on it takes the flavour from :func:`detect_flavour`. Facts come from ``schedulers.md`` and the
PBS Pro Reference Guide ("qstat", "Job States").
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import JobStatus, State
from hpcbridge.schedulers.checks import check_array, check_ids, check_value

log = logging.getLogger(__name__)


# PBS job_state letters. Source: schedulers.md, PBS Pro Reference Guide "Job States" and the
# Torque Administrator Guide "qstat". F/C/X are reached by failed and cancelled jobs too; the
# exit status (when shown) refines them in _ended.
STATE_MAP: dict[str, State] = {
    "Q": State.QUEUED,
    "H": State.HELD,
    "W": State.QUEUED,  # waiting for its requested start time
    "T": State.QUEUED,  # in transit between servers
    "R": State.RUNNING,
    "E": State.RUNNING,  # exiting: the script ended, the server is cleaning up
    "B": State.RUNNING,  # array parent: at least one subjob has begun
    "S": State.HELD,  # suspended
    "U": State.HELD,  # suspended because the workstation is busy
    "X": State.FINISHED,  # subjob finished (PBS Pro)
    "F": State.FINISHED,  # finished, kept in PBS Pro job history (qstat -x)
    "C": State.FINISHED,  # completed (Torque, and the Slurm wrappers for every ended job)
}

# Letters after which the job will not run again, so an exit status is final.
_ENDED = frozenset("XFC")
# Those only PBS Pro uses: its job history (F) and its ended array subjobs (X).
_PBSPRO_ENDED = frozenset("XF")

# A PBS job id: sequence number, optional array brackets, optional server suffix.
JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.[A-Za-z0-9_.-]+)?$")
_SIGNAL_BASE = 256  # PBS reports "killed by signal N" as Exit_status 256 + N


def detect_flavour(version_output: str, returncode: int) -> str:
    """Tell the flavour from ``qstat --version``: "pbspro", "torque" or "wrapper".

    PBS Pro prints ``pbs_version = 2022.1.1`` and Torque ``Version: 6.1.3``; the Slurm PBS
    wrappers reject the option (non-zero exit and/or usage text).
    """
    if re.search(r"pbs_version\s*=", version_output):
        return "pbspro"
    if re.search(r"^\s*Version:\s*\d", version_output, re.MULTILINE):
        return "torque"
    if returncode != 0 or "usage" in version_output.lower():
        return "wrapper"
    raise SchedulerError(
        f"cannot tell the PBS flavour from `qstat --version` output: {version_output.strip()!r}",
        hint="set the scheduler flavour explicitly in the profile",
    )


FLAVOURS = ("pbspro", "torque", "wrapper")


def check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown PBS flavour {flavour!r}; expected one of {FLAVOURS}")


def _check_value(what: str, value: str) -> str:
    return check_value("qsub", what, value)


def check_pbs_ids(ids: Sequence[str]) -> list[str]:
    return check_ids("PBS", JOB_ID, ids)


def _check_log_path(what: str, path: str) -> str:
    # A directory (trailing "/") is legal PBS but fails the wrapper's jobs; whitespace breaks it.
    if not path.startswith("/") or path.endswith("/") or re.search(r"\s", path):
        raise SchedulerError(f"invalid {what} path for qsub: {path!r} (need an absolute file path)")
    return path


def submit_argv(
    script_path: str,
    *,
    after: Sequence[str] = (),
    array: str | None = None,
    flavour: str,
    project: str | None = None,
    queue: str | None = None,
    stdout: str | None = None,
    stderr: str | None = None,
) -> list[str]:
    """The ``qsub`` argv submitting ``script_path``.

    ``-P`` goes on the command line, never into the script: the wrappers fail on ``#PBS -P``
    while PBS Pro honours both. Arrays are ``-J`` on PBS Pro and the wrappers, ``-t`` on Torque.
    ``stdout``/``stderr`` become ``-o``/``-e``, which the wrappers ignore inside scripts.
    """
    check_flavour(flavour)
    # The wrapper builds an unquoted sbatch command string, so whitespace breaks it.
    if flavour == "wrapper" and re.search(r"\s", script_path):
        raise SchedulerError(
            f"the Slurm PBS wrapper cannot submit a script whose path has spaces: {script_path!r}"
        )
    argv = ["qsub"]
    if queue is not None:
        argv += ["-q", _check_value("queue", queue)]
    if project is not None:
        # Torque's -P means "run as this user"; its accounting string is -A.
        argv += ["-A" if flavour == "torque" else "-P", _check_value("project", project)]
    if after:
        argv += ["-W", "depend=afterok:" + ":".join(check_pbs_ids(after))]
    if array is not None:
        argv += ["-t" if flavour == "torque" else "-J", check_array("qsub", array)]
    if stdout is not None:
        argv += ["-o", _check_log_path("stdout", stdout)]
    if stderr is not None:
        argv += ["-e", _check_log_path("stderr", stderr)]
    argv.append(script_path)
    return argv


def status_argv(ids: Sequence[str], *, flavour: str, json_output: bool = False) -> list[str]:
    """``qstat -f`` for all ``ids`` in one call (centres ask for one poll, not one per job).

    ``-x`` (job history) is added on PBS Pro only: on Torque it means XML, and the wrappers
    reject it. ``-F json`` exists on PBS Pro only.
    """
    check_flavour(flavour)
    if not ids:
        raise ValueError("status_argv needs at least one job id (qstat -f alone lists every job)")
    if json_output and flavour != "pbspro":
        raise SchedulerError(f"qstat -F json is only available on PBS Pro, not {flavour}")
    argv = ["qstat", "-f"]
    if json_output:
        argv += ["-F", "json"]
    if flavour == "pbspro":
        argv.append("-x")
    return argv + check_pbs_ids(ids)


def find_argv(name: str, *, flavour: str) -> list[str]:
    """``qselect -N NAME``: the ids of jobs by name; PBS Pro's ``-x`` adds ended jobs kept in
    its history (Torque's qselect has no history to search)."""
    check_flavour(flavour)
    argv = ["qselect", "-N", _check_value("job name", name)]
    return argv[:1] + ["-x"] + argv[1:] if flavour == "pbspro" else argv


def parse_found(stdout: str) -> list[str]:
    """Job ids from ``qselect``, one per line, in the order given."""
    return [line.strip() for line in stdout.splitlines() if line.strip()]


def cancel_argv(ids: Sequence[str]) -> list[str]:
    """``qdel`` for all ``ids``."""
    if not ids:
        raise ValueError("cancel_argv needs at least one job id")
    return ["qdel", *check_pbs_ids(ids)]


def parse_submit(stdout: str) -> str:
    """The job id ``qsub`` printed: ``2238022.pbsserver``, ``123[].server`` or a bare ``65``."""
    # Site submit filters may print notices first; the id is the last line that looks like one.
    for line in reversed(stdout.strip().splitlines()):
        if JOB_ID.match(line.strip()):
            return line.strip()
    raise SchedulerError(
        f"qsub printed no job id: {stdout.strip()[:300]!r}",
        hint="check the submission output above; the job may not have been queued",
    )


# An attribute line: indented "name = value". PBS Pro and Torque indent attributes with four
# spaces and fold long values onto lines that begin with a tab; the Slurm wrappers indent
# attributes with a tab. Names are word characters and dots (Resource_List.walltime).
_ATTRIBUTE = re.compile(r"^(\s+)([A-Za-z_][\w.]*)\s+=(?:\s|$)")


def _attribute_indent(lines: Sequence[str]) -> str | None:
    """The indentation of the attribute lines: that of the first line after a ``Job Id:``."""
    for before, line in zip(lines, lines[1:], strict=False):
        if before.startswith("Job Id:"):
            match = _ATTRIBUTE.match(line)
            if match:
                return match.group(1)
    return None


def _unfold(text: str) -> list[str]:
    """Join folded continuation lines onto the attribute they continue.

    A line is a new attribute only when it is indented exactly as the attributes are and reads
    ``name = value``; any other indented line continues the value before it. So a folded
    Variable_List piece that happens to contain " = " is not taken for an attribute when the
    attributes are space-indented, and continuation lines may start with a tab or with spaces
    (versions differ). A tab is the fold's only own character: PBS splits a value at a fixed
    width, even inside a word, and keeps the value's own spaces on either side of the fold.
    """
    raw = text.splitlines()
    indent = _attribute_indent(raw)
    lines: list[str] = []
    for line in raw:
        match = _ATTRIBUTE.match(line)
        is_attribute = match is not None and (indent is None or match.group(1) == indent)
        leading = line[: len(line) - len(line.lstrip(" \t"))]
        continues = (
            lines
            and leading
            and not is_attribute
            # a line indented as the attributes are is one, if malformed; except that the
            # wrappers' tab is also what folds begin with
            and (leading != indent or leading == "\t")
            and not lines[-1].startswith("Job Id:")
            and lines[-1].strip() != ""
        )
        if continues:
            # A tab is the fold's own character (the value's spaces follow it); a fold
            # indented with spaces is layout, all of it.
            lines[-1] += line[1:] if line.startswith("\t") else line.lstrip(" ")
        else:
            lines.append(line)
    return lines


def _exit_code(value: object, native_id: str) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        log.warning("job %s: exit status %r is not a number; ignoring it", native_id, value)
        return None


# PBS Pro's Exit_status values below zero that are not the job's own (src/include/job.h,
# JOB_EXEC_*): a resource the job exceeded, so the mom killed it ...
_PBSPRO_KILLS = {
    -24: "ncpus",  # JOB_EXEC_KILL_NCPUS_BURST
    -25: "ncpus",  # JOB_EXEC_KILL_NCPUS_SUM
    -26: "vmem",  # JOB_EXEC_KILL_VMEM
    -27: "memory",  # JOB_EXEC_KILL_MEM
    -28: "cput",  # JOB_EXEC_KILL_CPUT
    -29: "walltime",  # JOB_EXEC_KILL_WALLTIME
}
# ... or a reason the server could not run it at all. Only codes whose meaning job.h states
# plainly; any other negative code gets a generic sentence naming the number.
_PBSPRO_EXEC = {
    -1: "the server could not run the job (execution failed before its files were set up)",
    -2: "the server could not run the job (execution failed after its files were set up)",
    -3: "the job could not start on its node and is to be retried",
    -4: "the job was aborted when its node's PBS daemon (mom) restarted",
    -10: "the job's user or group is not valid on the execution node",
    -11: "the job was requeued to run again",
    -17: "a site hook rejected the job, which was then deleted",
    -19: "a site hook deleted the job",
    -20: "the job lost contact with its first node (mother superior) and was requeued",
    -22: "a site hook failed while starting the job",
}
# The comment PBS Pro leaves on a job it killed: "... and exceeded resource walltime".
_EXCEEDED = re.compile(r"exceeded resource (\w+)")
_RESOURCE_CAUSE = {
    "walltime": "walltime",
    "mem": "memory",
    "vmem": "vmem",
    "cput": "cput",
    "ncpus": "ncpus",
}
_CAUSE_LIMIT = {v: f"Resource_List.{k}" for k, v in _RESOURCE_CAUSE.items()}
# PBS Pro substates of an ended job (job.h JOB_SUBSTATE_*): 91 deleted (TERMINATED),
# 92 finished, 93 failed. Substate 91 is a qdel, whether the job ran or not, but also a failed
# job whose dependents the server deleted.
_SUBSTATE_DELETED = 91
_SUBSTATE_FAILED = 93
_SUBSTATE_MOVED = 94  # JOB_SUBSTATE_MOVED
# "Job run at ... and terminated by alice@host": who deleted a running job.
_TERMINATED_BY = re.compile(r"terminated by (\S+)")
NEVER_RAN = "deleted before it ran (by qdel, or by the server because a job it depends on failed)"


def _flatten(fields: Mapping[str, object]) -> dict[str, object]:
    """JSON nests ``Resource_List`` and ``resources_used``; text spells them with a dot. Both
    come out as ``Resource_List.walltime`` so one function reads either."""
    flat: dict[str, object] = {}
    for key, value in fields.items():
        if isinstance(value, Mapping):
            for inner, item in value.items():
                flat[f"{key}.{inner}"] = item
        else:
            flat[key] = value
    return flat


def _substate(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _state(raw: str, native_id: str) -> State:
    state = STATE_MAP.get(raw)
    if state is None:
        log.warning("job %s: unknown PBS job_state %r; treating it as unknown", native_id, raw)
        return State.UNKNOWN
    return state


def _kill(exit_code: int | None, pbspro: bool, comment: str) -> tuple[int | None, str | None, str]:
    """(signal, killed_by, reason) from the exit status and the server's comment."""
    signal = killed_by = None
    reason = comment
    if exit_code is not None and exit_code >= _SIGNAL_BASE:
        signal, killed_by = exit_code - _SIGNAL_BASE, "signal"
    elif exit_code is not None and pbspro and exit_code in _PBSPRO_KILLS:
        killed_by = _PBSPRO_KILLS[exit_code]
    elif exit_code is not None and exit_code < 0:
        meaning = _PBSPRO_EXEC.get(exit_code) if pbspro else None
        meaning = meaning or f"{'PBS Pro' if pbspro else 'the PBS server'} could not run the job"
        reason = f"{meaning} (PBS exit status {exit_code})" + (f": {comment}" if comment else "")
    exceeded = _EXCEEDED.search(comment)
    if exceeded and exceeded.group(1) in _RESOURCE_CAUSE:
        # The comment names the resource even where the exit status is a bare 271 (a signal).
        killed_by = _RESOURCE_CAUSE[exceeded.group(1)]
    return signal, killed_by, reason


def _ended(status: JobStatus, substate: int | None, comment: str, no_exit: bool) -> JobStatus:
    """How a job in an ended state (X, F, C) ended."""
    exit_code = status.exit_code
    deleted_by = _TERMINATED_BY.search(comment)
    # Versions without substates still leave the comment of a qdel'd running job.
    # A script's own exit status is the truth about a job that ran to its end: the server
    # also marks a failed job whose afterok dependents it deletes as "terminated by
    # root", substate 91, though nobody deleted it.
    ran_to_end = exit_code is not None and 0 <= exit_code < _SIGNAL_BASE
    if not ran_to_end and (substate == _SUBSTATE_DELETED or (substate is None and deleted_by)):
        reason = f"deleted by {deleted_by.group(1)}" if deleted_by else (comment or "deleted")
        return replace(status, state=State.CANCELLED, reason=reason)
    if substate == _SUBSTATE_MOVED:
        # Left for another server (peer scheduling): it lives on there, out of sight.
        return replace(status, state=State.UNKNOWN, reason=comment or "moved to another PBS server")
    if (
        status.raw_state in _PBSPRO_ENDED
        and no_exit
        and "Job run at" not in comment
        and "[]" not in status.native_id
    ):
        # PBS Pro sets Exit_status when a job's run ends; a job with none never ran: it
        # was deleted while queued, or by the server because an afterok parent failed.
        # (Torque's and the wrappers' C shows no exit status for jobs that did run, and an
        # array parent never runs itself: its subjobs and their status files decide.)
        return replace(status, state=State.CANCELLED, reason=comment or NEVER_RAN)
    if substate == _SUBSTATE_FAILED:
        # An array whose subjob failed ends F, substate 93, with Exit_status 0 ("Job Array
        # Began at ... and failed"): the 0 is not the array's outcome.
        return replace(status, state=State.FAILED, exit_code=exit_code or None)
    if exit_code is not None and exit_code != 0:
        # >0 the script failed, >=256 killed by a signal, <0 the server killed it or could
        # not run it.
        return replace(status, state=State.FAILED)
    return status


def _status(native_id: str, fields: Mapping[str, object]) -> JobStatus:
    """Build a JobStatus from one job's attributes (from text or JSON)."""
    fields = _flatten(fields)
    raw = str(fields.get("job_state", "")).strip()
    comment = str(fields.get("comment", "")).strip()
    # Torque spells it exit_status; PBS Pro Exit_status. Their negative codes differ, so the
    # PBS Pro table is read only for PBS Pro's spelling.
    exit_value = fields.get("Exit_status", fields.get("exit_status"))
    exit_code = None if exit_value is None else _exit_code(exit_value, native_id)
    signal, killed_by, reason = _kill(exit_code, "Exit_status" in fields, comment)
    limit = fields.get(_CAUSE_LIMIT.get(killed_by or "", ""))
    status = JobStatus(
        native_id=native_id,
        state=_state(raw, native_id),
        raw_state=raw,
        exit_code=exit_code,
        name=str(fields.get("Job_Name", "")),
        reason=reason,
        signal=signal,
        killed_by=killed_by,
        limit=None if limit is None else str(limit).strip(),
    )
    if raw in _ENDED:
        substate = _substate(fields.get("substate", ""))
        return _ended(status, substate, comment, exit_value is None)
    return status


def parse_qstat_full(text: str) -> dict[str, JobStatus]:
    """Parse ``qstat -f`` text (any flavour) into statuses keyed by job id."""
    blocks: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in _unfold(text):
        if line.startswith("Job Id:"):
            current = blocks.setdefault(line.split(":", 1)[1].strip(), {})
        elif current is not None and (match := _ATTRIBUTE.match(line)):
            # Split at the first " = " only: values hold "=" and " = " of their own.
            current[match.group(2)] = line[match.end() :].strip()
        elif not line.strip():
            current = None  # a blank line ends the job's block
    return {native_id: _status(native_id, fields) for native_id, fields in blocks.items()}


def parse_qstat_json(text: str) -> dict[str, JobStatus]:
    """Parse PBS Pro ``qstat -f -F json`` output into statuses keyed by job id."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # Some PBS Pro releases emit unescaped characters from Variable_List; the caller can
        # fall back to the text format.
        raise SchedulerError(
            f"qstat -F json printed invalid JSON ({exc}): {text.strip()[:200]!r}",
            hint="poll with plain `qstat -f` instead",
        ) from exc
    # The server leaves "Jobs" out entirely when none of the ids is known.
    jobs = data.get("Jobs", {}) if isinstance(data, dict) else None
    if not isinstance(jobs, dict) or not all(isinstance(v, dict) for v in jobs.values()):
        raise SchedulerError(f"unexpected qstat JSON structure: {text.strip()[:200]!r}")
    return {native_id: _status(native_id, fields) for native_id, fields in jobs.items()}


_UNKNOWN_ID = re.compile(r"Unknown Job Id(?: Error)?\s+(\S+)", re.IGNORECASE)
UNKNOWN_EXIT = 153  # Torque's PBSE_UNKJOBID; the wrappers reuse it with no message


def unknown_job(stderr: str, returncode: int) -> bool:
    """True when qstat/qdel failed because the server no longer knows the job.

    Torque and PBS Pro say "Unknown Job Id" (Torque with exit 153); the wrappers exit 153 with
    no output at all. Any other failure is a failed poll, not a vanished job.
    """
    if returncode == 0:
        return False
    if "unknown job id" in stderr.lower():
        return True
    return returncode == UNKNOWN_EXIT and not stderr.strip()


def unknown_job_ids(stderr: str) -> set[str]:
    """The ids named in "Unknown Job Id" messages, for a poll of several jobs at once."""
    return set(_UNKNOWN_ID.findall(stderr))


def short_id(native_id: str) -> str:
    """``123.server`` -> ``123``: servers print ids with or without their suffix."""
    return native_id.split(".", 1)[0]
