"""The ledger's jobs, one per scan of a run, and their events: every change of state is the job
row and its event in one transaction, and only along :data:`~.schema.TRANSITIONS`."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import LedgerError
from ..units import utc_stamp
from .database import Database, insert
from .runs import fetch_run
from .schema import (
    EVENT_COLUMNS,
    JOB_COLUMNS,
    TRANSITIONS,
    Event,
    JobRow,
    JobState,
    dumps,
    encode_fields,
    parse_state,
)

_S = JobState
# The time column stamped on entering a state.
_STAMPS = {_S.SUBMITTED: "submitted_at", _S.RUNNING: "started_at", _S.UPLOADED: "uploaded_at"}
_STAMPS |= dict.fromkeys((_S.FINISHED, _S.FAILED, _S.CANCELLED), "ended_at")

# What a retry forgets: the previous attempt's outcome would otherwise be shown as the new one's.
_RETRY_CLEARS: tuple[str, ...] = ("native_id", "exit_code", "last_error", "log_tail", "raw_state")
_RETRY_CLEARS += ("submitted_at", "started_at", "ended_at")
# A retry of the upload alone keeps the job that made the outputs (its id, exit code, times).
_UPLOAD_RETRY_CLEARS = ("last_error", "log_tail")

_COLUMNS = ", ".join(JOB_COLUMNS)


def _changes(job: JobRow, target: JobState, now: str) -> tuple[dict[str, Any], bool]:
    """The columns that moving ``job`` to ``target`` sets, and whether it is a retry (which
    counts an attempt)."""
    if target not in TRANSITIONS[job.state]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[job.state])) or "none"
        raise LedgerError(
            f"job {job.job_id} ({job.name}) cannot go from {job.state} to {target}",
            hint=f"from {job.state}: {allowed}",
        )
    changes: dict[str, Any] = {"state": target.value}
    upload_again = job.state is JobState.FAILED and target is JobState.FINISHED
    retry = target is JobState.PLANNED or upload_again
    if upload_again:
        changes.update(dict.fromkeys(_UPLOAD_RETRY_CLEARS))
    elif retry:
        changes.update(dict.fromkeys(_RETRY_CLEARS))
    if target in _STAMPS and not upload_again:
        changes[_STAMPS[target]] = now
    return changes, retry


def _set(
    conn: sqlite3.Connection, job_id: int, values: Mapping[str, Any], now: str, *, retry: bool
) -> None:
    # Column names come from JOB_FIELDS and our own constants, never from callers' text.
    assignments = [f"{name} = ?" for name in values] + ["updated_at = ?"]
    if retry:
        assignments.append("attempts = attempts + 1")
    conn.execute(
        f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?", [*values.values(), now, job_id]
    )


def _record(
    conn: sqlite3.Connection, job_id: int, at: str, came: JobState | None, to: JobState, detail: str
) -> None:
    values = {"job_id": job_id, "at": at, "to_state": to.value, "detail": detail}
    insert(conn, "events", {**values, "from_state": came.value if came else None})


class JobQueries(Database):
    """The :class:`~hpcbridge.ledger.Ledger` methods about jobs and their events."""

    def _job(self, conn: sqlite3.Connection, job_id: int) -> JobRow:
        row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise LedgerError.no_job(job_id, self.path)
        return JobRow.from_row(row)

    def add_job(
        self,
        run_id: int,
        *,
        address: str,
        project: str | None,
        subject: str | None,
        experiment: str | None,
        experiment_id: str | None = None,
        scan: str | None,
        scan_type: str | None = None,
        name: str,
        work_dir: str | os.PathLike[str] | None = None,
    ) -> JobRow:
        """Plan one scan's job; planning the same scan again returns the existing row as is,
        so a re-run of an interrupted ``run`` picks up where it was."""
        now = utc_stamp()
        row = {"run_id": run_id, "address": address, "project": project, "subject": subject}
        row |= {"experiment": experiment, "experiment_id": experiment_id, "scan": scan}
        row |= {"scan_type": scan_type, "name": name}
        row |= {"work_dir": os.fspath(work_dir) if work_dir is not None else None}
        with self._tx(write=True) as conn:
            found = conn.execute(
                "SELECT id FROM jobs WHERE run_id = ? AND address = ?", (run_id, address)
            ).fetchone()
            if found is not None:
                return self._job(conn, found["id"])
            fetch_run(conn, run_id)
            taken = conn.execute(
                "SELECT id, run_id, address FROM jobs WHERE name = ?", (name,)
            ).fetchone()
            if taken is not None:
                raise LedgerError(
                    f"job name {name!r} is already used by job {taken['id']} "
                    f"({taken['address']} in run {taken['run_id']})",
                    hint="job names must be unique in the ledger: they find submitted jobs",
                )
            job_id = insert(conn, "jobs", {**row, "state": _S.PLANNED.value, "updated_at": now})
            _record(conn, job_id, now, None, _S.PLANNED, "planned")
            return self._job(conn, job_id)

    def job(self, job_id: int) -> JobRow:
        with self._tx(write=False) as conn:
            return self._job(conn, job_id)

    def jobs(self, run_id: int, states: Iterable[JobState | str] | None = None) -> list[JobRow]:
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE run_id = ?"
        args: list[Any] = [run_id]
        if isinstance(states, str):  # one state (JobState is a str too), not its letters
            states = [states]
        if states is not None:
            wanted = sorted({parse_state(s, JobState).value for s in states})
            if not wanted:
                return []
            sql += f" AND state IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._tx(write=False) as conn:
            return [JobRow.from_row(row) for row in conn.execute(sql + " ORDER BY id", args)]

    def transition(
        self, job_id: int, to: JobState | str, *, detail: str = "", **fields: Any
    ) -> JobRow:
        """Move a job to state ``to``, storing ``fields`` with it and recording the event, all
        in one transaction. Moving to the state it is in records nothing new but the fields."""
        target = parse_state(to, JobState)
        values = encode_fields(fields)
        now = utc_stamp()
        with self._tx(write=True) as conn:
            job = self._job(conn, job_id)
            if job.state is target:
                if not values:
                    return job
                _set(conn, job_id, values, now, retry=False)
            else:
                changes, retry = _changes(job, target, now)
                _set(conn, job_id, changes | values, now, retry=retry)
                _record(conn, job_id, now, job.state, target, detail)
            return self._job(conn, job_id)

    def update(self, job_id: int, **fields: Any) -> JobRow:
        """Store ``fields`` without a change of state (and so without an event)."""
        values = encode_fields(fields)
        with self._tx(write=True) as conn:
            self._job(conn, job_id)
            if values:
                _set(conn, job_id, values, utc_stamp(), retry=False)
            return self._job(conn, job_id)

    def events(self, job_id: int) -> list[Event]:
        with self._tx(write=False) as conn:
            self._job(conn, job_id)
            rows = conn.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM events WHERE job_id = ? ORDER BY id",
                (job_id,),
            )
            return [Event.from_row(row) for row in rows]

    def counts(self, run_id: int) -> dict[str, int]:
        """Jobs per state, every state present, in the order of :class:`JobState`."""
        result = {state.value: 0 for state in JobState}
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT state, COUNT(*) AS n FROM jobs WHERE run_id = ? GROUP BY state", (run_id,)
            )
            for row in rows:
                result[row["state"]] = row["n"]
        return result

    def find_done(self, recipe: str, params: Mapping[str, Any], address: str) -> JobRow | None:
        """The latest uploaded job of any run that applied ``recipe`` with these ``params`` to
        the scan at ``address``: the scan needs no converting again."""
        wanted = json.loads(dumps(dict(params), "the recipe parameters"))
        columns = ", ".join(f"j.{name}" for name in JOB_COLUMNS)
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {columns}, r.params AS run_params FROM jobs j"
                " JOIN runs r ON r.id = j.run_id"
                " WHERE j.address = ? AND j.state = ? AND r.recipe = ? ORDER BY j.id DESC",
                (address, JobState.UPLOADED.value, recipe),
            ).fetchall()
        for row in rows:
            # Compared as values, not text, so 1 and 1.0 or a ledger written by hand still match.
            if json.loads(row["run_params"]) == wanted:
                return JobRow.from_row(row)
        return None
