"""The ledger's schema: its tables, built by :data:`MIGRATIONS` (numbered by ``PRAGMA
user_version``), and the Python side of what they hold: job and run states, the legal changes
of state, the row dataclasses and their conversion to and from the text SQLite stores."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, TypeVar

from ..errors import LedgerError

#: The schema, one script per version; the ledger's ``PRAGMA user_version`` is how many have been
#: applied. Append only: never edit a released entry, ledgers in the field already ran it. States
#: are not CHECK-constrained so that a new state does not need a table rebuild.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        recipe TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        target TEXT NOT NULL,
        profile TEXT NOT NULL,
        options TEXT NOT NULL DEFAULT '{}',
        created TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'active'
    );
    CREATE INDEX runs_profile ON runs (profile);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        project TEXT,
        subject TEXT,
        experiment TEXT,
        experiment_id TEXT,
        scan TEXT,
        scan_type TEXT,
        name TEXT NOT NULL UNIQUE,
        work_dir TEXT,
        script_hash TEXT,
        native_id TEXT,
        state TEXT NOT NULL DEFAULT 'planned',
        raw_state TEXT,
        exit_code INTEGER,
        submitted_at TEXT,
        started_at TEXT,
        ended_at TEXT,
        uploaded_at TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        log_tail TEXT,
        uploaded TEXT NOT NULL DEFAULT '[]',
        extra TEXT NOT NULL DEFAULT '{}',
        updated_at TEXT NOT NULL,
        UNIQUE (run_id, address)
    );
    CREATE INDEX jobs_run_state ON jobs (run_id, state);
    CREATE INDEX jobs_native_id ON jobs (native_id);
    -- find_done looks every planned scan up across all runs.
    CREATE INDEX jobs_address ON jobs (address, state);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        at TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_job ON events (job_id);
    """,
]


def statements(script: str) -> Iterator[str]:
    """Split a migration script so each statement runs with ``execute`` in our transaction
    (``executescript`` would commit first); ``complete_statement`` keeps a ``;`` inside a
    string or a trigger body where it belongs."""
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(";").strip():
                yield buffer.strip()
            buffer = ""
    if buffer.strip(";").strip():
        raise LedgerError(f"incomplete statement in a ledger migration: {buffer.strip()!r}")


def tables_made_by(version: int) -> set[str]:
    """The tables the first ``version`` migrations leave, so a ledger at that version that
    lacks one is known to be damaged rather than failing later on a query."""
    tables: set[str] = set()
    name = r"[\"`\[]?(\w+)[\"`\]]?"
    for script in MIGRATIONS[:version]:
        for statement in statements(re.sub(r"--[^\n]*", "", script)):
            if m := re.match(rf"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{name}", statement, re.I):
                tables.add(m.group(1).lower())
            elif m := re.match(rf"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?{name}", statement, re.I):
                tables.discard(m.group(1).lower())
            elif m := re.match(rf"ALTER\s+TABLE\s+{name}\s+RENAME\s+TO\s+{name}", statement, re.I):
                tables.discard(m.group(1).lower())
                tables.add(m.group(2).lower())
    return tables


def migrate(tx: sqlite3.Connection, number: int) -> None:
    """Apply migration ``number`` (from 1) in the open transaction ``tx``, unless another
    process did since we looked."""
    if tx.execute("PRAGMA user_version").fetchone()[0] < number:
        for statement in statements(MIGRATIONS[number - 1]):
            tx.execute(statement)
        tx.execute(f"PRAGMA user_version = {number}")


class JobState(str, Enum):
    """Where a job is. ``uploaded`` is done; ``failed`` and ``cancelled`` wait for a retry."""

    PLANNED = "planned"
    STAGED = "staged"
    SUBMITTED = "submitted"
    RUNNING = "running"
    FINISHED = "finished"
    UPLOADED = "uploaded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # f-strings and messages show "running", not "JobState.RUNNING"
        return self.value

    @property
    def final(self) -> bool:
        """Nothing more happens to the job in this run unless it is retried."""
        return self in FINAL_STATES


class RunState(str, Enum):
    ACTIVE = "active"
    DONE = "done"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({JobState.UPLOADED, JobState.FAILED, JobState.CANCELLED})

_S = JobState
#: Every allowed change of state. ``planned -> submitted`` is for chains, whose stage-in runs as
#: a job on the cluster; ``failed``/``cancelled -> planned`` is a retry, and so is ``failed ->
#: finished``: a job that ended well but whose outputs could not be uploaded is uploaded again,
#: not computed again. ``submitted``/``running -> planned`` is a chain whose transfer job found
#: XNAT away: that step's job is submitted again once the run's backoff is over.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    _S.PLANNED: frozenset({_S.STAGED, _S.SUBMITTED, _S.FAILED, _S.CANCELLED}),
    _S.STAGED: frozenset({_S.SUBMITTED, _S.FAILED, _S.CANCELLED}),
    _S.SUBMITTED: frozenset({_S.PLANNED, _S.RUNNING, _S.FINISHED, _S.FAILED, _S.CANCELLED}),
    _S.RUNNING: frozenset({_S.PLANNED, _S.FINISHED, _S.FAILED, _S.CANCELLED}),
    _S.FINISHED: frozenset({_S.UPLOADED, _S.FAILED}),
    _S.UPLOADED: frozenset(),
    _S.FAILED: frozenset({_S.PLANNED, _S.FINISHED}),
    _S.CANCELLED: frozenset({_S.PLANNED}),
}

#: Job columns that :meth:`Ledger.transition` and :meth:`Ledger.update` may set.
JOB_FIELDS = frozenset(
    {"native_id", "raw_state", "exit_code", "script_hash", "last_error", "log_tail"}
    | {"uploaded", "extra", "work_dir"}
)


@dataclass(frozen=True)
class Run:
    """One ``hpcbridge run``: a recipe with its parameters over the scans of one XNAT address."""

    id: int
    recipe: str
    params: dict[str, Any]
    target: str
    profile: str
    options: dict[str, Any]
    created: str
    state: RunState

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Run:
        data = {name: row[name] for name in RUN_COLUMNS}
        data.update(params=json.loads(data["params"]), options=json.loads(data["options"]))
        return cls(**{**data, "state": RunState(data["state"])})


@dataclass(frozen=True)
class JobRow:
    """One scan's job within a run, as the ledger last recorded it: ``job_id`` is ours (the
    jobs table's ``id``), ``native_id`` the scheduler's."""

    job_id: int
    run_id: int
    address: str
    project: str | None
    subject: str | None
    experiment: str | None
    experiment_id: str | None
    scan: str | None
    scan_type: str | None
    name: str
    work_dir: str | None
    script_hash: str | None
    native_id: str | None
    state: JobState
    raw_state: str | None
    exit_code: int | None
    submitted_at: str | None
    started_at: str | None
    ended_at: str | None
    uploaded_at: str | None
    attempts: int
    last_error: str | None
    log_tail: str | None
    uploaded: list[dict[str, Any]]
    extra: dict[str, Any]
    updated_at: str

    @property
    def final(self) -> bool:
        return self.state.final

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRow:
        data = {f.name: row[column] for f, column in zip(fields(cls), JOB_COLUMNS, strict=True)}
        data["state"] = JobState(data["state"])
        data["uploaded"] = json.loads(data["uploaded"] or "[]")
        data["extra"] = json.loads(data["extra"] or "{}")
        return cls(**data)


@dataclass(frozen=True)
class Event:
    """One recorded state change; ``from_state`` is None for the job's creation."""

    id: int
    job_id: int
    at: str
    from_state: JobState | None
    to_state: JobState
    detail: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Event:
        data = {name: row[name] for name in EVENT_COLUMNS}
        data["from_state"] = JobState(data["from_state"]) if data["from_state"] else None
        return cls(**{**data, "to_state": JobState(data["to_state"])})


RUN_COLUMNS = tuple(f.name for f in fields(Run))
JOB_COLUMNS = ("id", *(f.name for f in fields(JobRow)[1:]))
EVENT_COLUMNS = tuple(f.name for f in fields(Event))


def dumps(value: Any, what: str) -> str:
    """Canonical JSON, so equal values are equal text (find_done and diffs of the file rely on
    it)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{what} cannot be recorded in the ledger: {exc}") from None


State = TypeVar("State", JobState, RunState)


def parse_state(value: Any, kind: type[State]) -> State:
    """``value`` as a member of ``kind``, or a LedgerError listing the known states."""
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(s.value for s in kind)
        what = "job" if kind is JobState else "run"
        raise LedgerError(f"unknown {what} state {value!r}", hint=f"one of {known}") from None


def encode_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Job fields as their columns hold them; a TypeError for a field that is not settable."""
    unknown = sorted(set(values) - JOB_FIELDS)
    if unknown:
        # A caller's typo, not a user's mistake: fail the way Python does for a bad keyword.
        raise TypeError(
            f"unknown job field(s) {', '.join(unknown)}; settable: {', '.join(sorted(JOB_FIELDS))}"
        )
    return {name: _encode(name, value) for name, value in values.items()}


def _encode(name: str, value: Any) -> Any:
    if name == "uploaded":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"uploaded must be a list of file records, not {value!r}")
        return dumps(list(value), "the uploaded file list")
    if name == "extra":
        if not isinstance(value, Mapping):
            raise TypeError(f"extra must be a dict, not {value!r}")
        return dumps(dict(value), "the job's extra data")
    if name == "work_dir" and value is not None:
        return os.fspath(value)
    if name == "exit_code" and value is not None:
        return int(value)
    return value
