"""The run ledger: an SQLite record of runs, their jobs, and every state change of every job.

A run over a thousand scans must survive being killed at any moment, and a cron ``sync`` may
write while a user's ``status`` reads. So every state change is one transaction (the job row and
its event together), writers take the database lock up front (``BEGIN IMMEDIATE``) so two writers
never deadlock half-way, and a job's state can only move along :data:`TRANSITIONS`: a second
process acting on a stale picture of a job gets a :class:`~hpcbridge.errors.LedgerError` instead
of silently undoing the first one's work.

Two modes, because many clusters put home directories on NFS:

- ``wal`` (default): write-ahead log, readers never block the writer. WAL keeps its index in a
  shared-memory file, which only works when every process is on one host's local file system.
- ``nfs``: rollback journal and ``synchronous=FULL``; each operation opens a fresh connection
  (NFS only guarantees that an ``open`` sees what another host wrote before its ``close``) and
  holds a lock file made with ``O_CREAT|O_EXCL``, which NFS does atomically even where its byte
  range locks, which SQLite relies on, are broken or local to one host.

The schema evolves through :data:`MIGRATIONS`, numbered by ``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LedgerError
from .units import utc_stamp

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "FINAL_STATES",
    "JOB_FIELDS",
    "MIGRATIONS",
    "MODES",
    "TRANSITIONS",
    "Event",
    "JobRow",
    "JobState",
    "Ledger",
    "Run",
    "RunState",
    "backup_folder",
    "filesystem_type",
    "ledger_backups",
    "ledger_path",
]

log = logging.getLogger(__name__)

MODES = ("wal", "nfs")


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

# The time column stamped on entering a state.
_STAMPS = {
    _S.SUBMITTED: "submitted_at",
    _S.RUNNING: "started_at",
    _S.FINISHED: "ended_at",
    _S.FAILED: "ended_at",
    _S.CANCELLED: "ended_at",
    _S.UPLOADED: "uploaded_at",
}

# What a retry forgets: the previous attempt's outcome would otherwise be shown as the new one's.
_RETRY_CLEARS: tuple[str, ...] = ("native_id", "exit_code", "last_error", "log_tail", "raw_state")
_RETRY_CLEARS += ("submitted_at", "started_at", "ended_at")
# A retry of the upload alone keeps the job that made the outputs (its id, exit code, times).
_UPLOAD_RETRY_CLEARS = ("last_error", "log_tail")

#: Job columns that :meth:`Ledger.transition` and :meth:`Ledger.update` may set.
JOB_FIELDS = frozenset(
    {"native_id", "raw_state", "exit_code", "script_hash", "last_error", "log_tail"}
    | {"uploaded", "extra", "work_dir"}
)

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

# File systems where WAL's shared-memory index is not shared between hosts.
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph")
_HOST = socket.gethostname()


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


@dataclass(frozen=True)
class JobRow:
    """One scan's job within a run, as the ledger last recorded it."""

    id: int
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


@dataclass(frozen=True)
class Event:
    """One recorded state change; ``from_state`` is None for the job's creation."""

    id: int
    job_id: int
    at: str
    from_state: JobState | None
    to_state: JobState
    detail: str


_RUN_COLUMNS = ", ".join(f.name for f in fields(Run))
_JOB_COLUMN_NAMES = tuple(f.name for f in fields(JobRow))
_JOB_COLUMNS = ", ".join(_JOB_COLUMN_NAMES)


def _dumps(value: Any, what: str) -> str:
    """Canonical JSON, so equal values are equal text (find_done and diffs of the file rely on
    it)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{what} cannot be recorded in the ledger: {exc}") from None


def _job_state(value: JobState | str) -> JobState:
    try:
        return JobState(value)
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise LedgerError(f"unknown job state {value!r}", hint=f"one of {known}") from None


def _statements(script: str) -> Iterator[str]:
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


def _encode_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - JOB_FIELDS)
    if unknown:
        # A caller's typo, not a user's mistake: fail the way Python does for a bad keyword.
        raise TypeError(
            f"unknown job field(s) {', '.join(unknown)}; settable: {', '.join(sorted(JOB_FIELDS))}"
        )
    encoded: dict[str, Any] = {}
    for name, value in values.items():
        if name == "uploaded":
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"uploaded must be a list of file records, not {value!r}")
            value = _dumps(list(value), "the uploaded file list")
        elif name == "extra":
            if not isinstance(value, Mapping):
                raise TypeError(f"extra must be a dict, not {value!r}")
            value = _dumps(dict(value), "the job's extra data")
        elif name == "work_dir" and value is not None:
            value = os.fspath(value)
        elif name == "exit_code" and value is not None:
            value = int(value)
        encoded[name] = value
    return encoded


def _run_from(row: sqlite3.Row) -> Run:
    return Run(
        id=row["id"],
        recipe=row["recipe"],
        params=json.loads(row["params"]),
        target=row["target"],
        profile=row["profile"],
        options=json.loads(row["options"]),
        created=row["created"],
        state=RunState(row["state"]),
    )


def _job_from(row: sqlite3.Row) -> JobRow:
    data = {name: row[name] for name in _JOB_COLUMN_NAMES}
    data["state"] = JobState(data["state"])
    data["uploaded"] = json.loads(data["uploaded"] or "[]")
    data["extra"] = json.loads(data["extra"] or "{}")
    return JobRow(**data)


def _event_from(row: sqlite3.Row) -> Event:
    return Event(
        id=row["id"],
        job_id=row["job_id"],
        at=row["at"],
        from_state=JobState(row["from_state"]) if row["from_state"] else None,
        to_state=JobState(row["to_state"]),
        detail=row["detail"],
    )


def ledger_path(settings: Settings) -> Path:
    """Where the settings put the ledger: ``ledger`` if set, else ``$HPCBRIDGE_HOME``."""
    if settings.ledger:
        return Path(settings.ledger).expanduser()
    return Path(settings.home) / "ledger.sqlite"


def backup_folder(path: str | os.PathLike[str]) -> Path:
    """Where the daily copies of the ledger at ``path`` are kept: ``ledger-backups`` beside
    ``ledger.sqlite``."""
    path = Path(path)
    return path.with_name(f"{path.stem}-backups")


def _backup_name(path: Path, day: str) -> str:
    return f"{path.stem}-{day}{path.suffix}"


def ledger_backups(path: str | os.PathLike[str]) -> list[Path]:
    """The daily copies of the ledger at ``path``, oldest first (their names hold the UTC day
    each was made)."""
    path = Path(path)
    folder = backup_folder(path)
    pattern = re.compile(re.escape(path.stem) + r"-\d{4}-\d{2}-\d{2}" + re.escape(path.suffix))
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
    except OSError:  # no folder yet, or unreadable: either way there is no copy to offer
        return []
    return [folder / name for name in sorted(names) if pattern.fullmatch(name)]


def _before_cp(leftovers: list[str]) -> str:
    # A journal or WAL left by the lost file would be replayed into the copy put back (a new
    # ledger removes them itself).
    return f"; before the `cp`, delete {' and '.join(leftovers)}" if leftovers else ""


def _tables_made_by(version: int) -> set[str]:
    """The tables the first ``version`` migrations leave, so a ledger at that version that
    lacks one is known to be damaged rather than failing later on a query."""
    tables: set[str] = set()
    name = r"[\"`\[]?(\w+)[\"`\]]?"
    for script in MIGRATIONS[:version]:
        for statement in _statements(re.sub(r"--[^\n]*", "", script)):
            if m := re.match(rf"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{name}", statement, re.I):
                tables.add(m.group(1).lower())
            elif m := re.match(rf"DROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?{name}", statement, re.I):
                tables.discard(m.group(1).lower())
            elif m := re.match(rf"ALTER\s+TABLE\s+{name}\s+RENAME\s+TO\s+{name}", statement, re.I):
                tables.discard(m.group(1).lower())
                tables.add(m.group(2).lower())
    return tables


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux), or None when it cannot be told."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
        target = str(path.resolve())
    except OSError:
        return None
    best, kind = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # later mounts hide earlier ones at one point
            best, kind = point, parts[2]
    return kind


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def break_stale_lock(lock: Path, seen: str, what: str) -> bool:
    """Remove the lock file ``lock`` that held ``seen`` when found stale; whether it was ours
    to remove (False: gone already, or a fresh lock taken meanwhile, which is put back).

    Renaming is atomic, so of several processes breaking one stale lock only one wins; the
    loser may instead have moved a fresh lock taken meanwhile, which it links back in place.
    Shared by the ledger's lock and the run locks (:mod:`hpcbridge.runlock`).
    """
    grave = lock.with_name(f"{lock.name}.{_HOST}.{os.getpid()}.stale")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot remove the stale {what} {lock}: {exc}") from None
    try:
        moved: str | None = grave.read_text()
    except OSError:
        moved = None
    if moved != seen:
        with contextlib.suppress(OSError):
            os.link(grave, lock)
    with contextlib.suppress(OSError):
        grave.unlink()
    return moved == seen


class Ledger:
    """The ledger file at ``path``; safe to share between processes and, per object, threads.

    ``busy_timeout`` bounds waiting for SQLite's own lock; in ``nfs`` mode ``lock_timeout``
    bounds waiting for the lock file, and a lock file older than ``stale_after`` seconds or
    whose holder is a dead process on this host is taken over.

    The first write of a UTC day (by ``clock``) leaves a checked copy of the ledger in
    :func:`backup_folder`, which keeps the newest ``keep_backups`` (0: no copies). An empty or
    damaged ledger file is refused with a :class:`~hpcbridge.errors.LedgerError` naming the
    last good copy, and never written over.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: str = "wal",
        busy_timeout: float = 30.0,
        lock_timeout: float = 60.0,
        stale_after: float = 600.0,
        keep_backups: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in MODES:
            raise LedgerError(f"unknown ledger mode {mode!r}", hint="wal, or nfs on NFS")
        self.path = Path(path)
        self.mode = mode
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.busy_timeout = busy_timeout
        self.lock_timeout = lock_timeout
        self.stale_after = stale_after
        self.keep_backups = keep_backups
        self._clock = clock
        self._backup_day: str | None = None  # the UTC day this object last looked
        self._mutex = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        self._lock_content: str | None = None
        self._closed = False
        self._create_file()
        self._found_beside = self._leftovers()
        if mode == "wal":
            fstype = filesystem_type(self.path.parent)
            if fstype and fstype.split(".")[-1] in _NETWORK_FS:
                log.warning(
                    'the ledger %s is on %s: set ledger_mode = "nfs" if hpcbridge may run on '
                    "more than one host (WAL needs memory shared between all its users)",
                    self.path,
                    fstype,
                )
        try:
            if mode == "wal":
                self._conn = self._connect()
            self._setup()
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_settings(cls, settings: Settings, **kwargs: Any) -> Ledger:
        """The ledger the settings name (see :func:`ledger_path`), in their ``ledger_mode``."""
        return cls(ledger_path(settings), mode=settings.ledger_mode, **kwargs)

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, mode={self.mode!r})"

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- opening ----------------------------------------------------------------------------

    def _create_file(self) -> None:
        """Make a new ledger if there is none; refuse an empty one.

        A new ledger appears whole: made as a temporary file, then linked into place. So an
        existing empty file is never one that hpcbridge was still creating: it is a ledger that
        lost its content (a full disk, a bad copy, ``>`` in a shell), and starting afresh
        over it would drop its history without a word.
        """
        try:
            self._refuse_empty()
            return
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc.strerror}") from None
        parent = self.path.parent
        try:
            if not parent.is_dir():
                parent.mkdir(parents=True, exist_ok=True)
                parent.chmod(0o700)  # holds what was run on which data; nobody else's business
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger {self.path}: {exc.strerror}") from None
        # Creators take the lock file so that none of them removes what another just made.
        self._acquire_lock()
        try:
            if not self.path.exists():
                self._make_new_file()
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger {self.path}: {exc.strerror}") from None
        except sqlite3.Error as exc:  # such as a full disk while writing the header
            raise LedgerError(f"cannot create the ledger {self.path}: {exc}") from None
        finally:
            self._release_lock()
        self._refuse_empty()

    def _make_new_file(self) -> None:
        prefix = f".{self.path.name}.new-"
        for entry in os.scandir(self.path.parent):
            if entry.name.startswith(prefix):  # a creator killed half-way; we hold the lock
                Path(entry.path).unlink(missing_ok=True)
        # A journal or WAL whose database is gone would be replayed into the new file.
        for suffix in ("-wal", "-journal", "-shm"):
            orphan = self.path.with_name(self.path.name + suffix)
            if orphan.exists():
                log.warning("removing %s: the ledger it belonged to no longer exists", orphan)
                orphan.unlink(missing_ok=True)
        temp = self.path.with_name(f".{self.path.name}.new-{secrets.token_hex(4)}")
        # SQLite gives its journal the database's permissions, so this covers those too.
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            conn = sqlite3.connect(temp, isolation_level=None)
            try:
                # Writes the header, so the file is a database (of schema version 0, which
                # _setup migrates) from the moment it has the ledger's name.
                conn.execute("PRAGMA user_version = 0")
            finally:
                conn.close()
            try:
                os.link(temp, self.path)  # unlike rename, never replaces a file made meanwhile
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                os.rename(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)

    def _refuse_empty(self) -> None:
        """Raise if the ledger file is empty; FileNotFoundError if there is none."""
        if self.path.stat().st_size > 0:
            return
        backups = ledger_backups(self.path)
        if backups:
            raise LedgerError(
                f"the ledger {self.path} is empty (0 bytes) but this machine has used it "
                "before; refusing to start a new one over it",
                hint=f"the last good copy is {backups[-1]}: `cp` it back, or move the empty file "
                f"away to start afresh{_before_cp(self._leftovers())}",
            )
        raise LedgerError(
            f"the ledger {self.path} is empty (0 bytes): what it held is lost; refusing to "
            "start a new one over it",
            hint=f"there is no copy of it in {backup_folder(self.path)}: move the empty file "
            "away to start afresh",
        )

    def _leftovers(self) -> list[str]:
        """The journal and WAL beside the ledger; called while this object has no connection
        open, so they are not its own."""
        beside = [self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-journal")]
        return [str(p) for p in beside if p.exists()]

    def _damaged(self, reason: object) -> LedgerError:
        backups = ledger_backups(self.path)
        # Those there before this object connected, and still there: SQLite drops a WAL it
        # finds nothing in when it closes.
        leftovers = [name for name in self._found_beside if os.path.exists(name)]
        if not backups:
            return LedgerError(
                f"the ledger {self.path} cannot be used: {reason}",
                hint="if it is not a ledger or is damaged, move it aside to start a new one",
            )
        return LedgerError(
            f"the ledger {self.path} cannot be used: {reason}",
            hint=f"it is damaged or not a ledger; the last good copy is {backups[-1]}: `cp` it "
            f"back, or move the damaged file away to start afresh{_before_cp(leftovers)}",
        )

    def _connect(self) -> sqlite3.Connection:
        # nfs mode connects for every operation: the file may have been emptied or removed
        # since the last one, and SQLite would take either for a new, empty database.
        try:
            self._refuse_empty()
        except OSError as exc:
            raise LedgerError(f"cannot open the ledger {self.path}: {exc.strerror}") from None
        with self._errors():
            conn = sqlite3.connect(
                # mode=rw: never create it; a missing ledger here was removed while in use.
                f"{self.path.absolute().as_uri()}?mode=rw",
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,  # we say where transactions begin and end
                check_same_thread=False,  # self._mutex serialises threads instead
            )
            try:
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute(f"PRAGMA synchronous = {'FULL' if self.mode == 'nfs' else 'NORMAL'}")
            except BaseException:
                conn.close()
                raise
        return conn

    def _setup(self) -> None:
        with self._errors(), self._session() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise LedgerError(
                    f"the ledger {self.path} was made by a newer hpcbridge (schema version "
                    f"{version}, this one knows up to {len(MIGRATIONS)}); upgrade hpcbridge",
                    hint="pip install --upgrade hpcbridge, or set `ledger` to another file",
                )
            self._check_whole(conn, version)
            if 0 < version < len(MIGRATIONS):
                self._backup(conn)  # an upgrade is the riskiest write a ledger sees
            wanted = "wal" if self.mode == "wal" else "delete"
            got = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0]
            if str(got).lower() != wanted:
                log.warning(
                    "the ledger %s stays in journal mode %s, not %s", self.path, got, wanted
                )
            for number in range(version + 1, len(MIGRATIONS) + 1):
                with self._tx(write=True) as tx:
                    # Another process may have migrated since we looked.
                    if tx.execute("PRAGMA user_version").fetchone()[0] < number:
                        for statement in _statements(MIGRATIONS[number - 1]):
                            tx.execute(statement)
                        tx.execute(f"PRAGMA user_version = {number}")

    def _check_whole(self, conn: sqlite3.Connection, version: int) -> None:
        """Refuse a ledger that lacks a table of its schema version before anything writes to
        it (a ledger cut short, SQLite refuses by itself on the first read)."""
        present = {
            str(row[0]).lower()
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = sorted(_tables_made_by(version) - present)
        if missing:
            raise self._damaged(
                f"it has no table {', '.join(missing)}, which its schema (version {version}) has"
            )

    def _backup(self, conn: sqlite3.Connection) -> None:
        """Copy the ledger into the backup folder unless today's copy is there, then keep the
        newest ``keep_backups``. Never fails the operation: a backup is a precaution."""
        day = time.strftime("%Y-%m-%d", time.gmtime(self._clock()))
        # Once a day per object, so a `sync --watch` that runs for a week copies every day.
        if self.keep_backups < 1 or day == self._backup_day:
            return
        self._backup_day = day
        folder = backup_folder(self.path)
        final = folder / _backup_name(self.path, day)
        existing = ledger_backups(self.path)
        # Names sort by day; a newer one means the clock went back, and that copy stays.
        if existing and existing[-1].name >= final.name:
            return
        temp = folder / f".{final.name}.new-{secrets.token_hex(4)}"
        try:
            if not folder.is_dir():
                folder.mkdir(exist_ok=True)
                folder.chmod(0o700)  # as private as the ledger it copies
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            copy = sqlite3.connect(temp, isolation_level=None)
            try:
                conn.backup(copy)
                # The copy is put back with `cp`: in rollback mode it needs no -wal beside it.
                copy.execute("PRAGMA journal_mode = delete")
                # The backup API copies pages as they are, so a damaged ledger gives a damaged
                # copy: checked here, it never joins (or rotates away) the good ones.
                verdict = [row[0] for row in copy.execute("PRAGMA quick_check")]
            finally:
                copy.close()
            if verdict != ["ok"]:
                log.warning(
                    "the ledger %s fails SQLite's quick_check (%s); not backed up, the last good "
                    "copy stays %s",
                    self.path,
                    "; ".join(verdict[:3]),
                    existing[-1] if existing else "(none)",
                )
                return
            os.replace(temp, final)
            for old in ledger_backups(self.path)[: -self.keep_backups]:
                old.unlink(missing_ok=True)
        except (OSError, sqlite3.Error) as exc:
            log.warning("could not back up the ledger %s to %s: %s", self.path, folder, exc)
        finally:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)

    # -- transactions and the lock file ------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise LedgerError(
                    f"the ledger {self.path} is busy: another process held it for more than "
                    f"{self.busy_timeout:g} s",
                    hint="try again; a long-running hpcbridge may be writing to it",
                ) from None
            raise LedgerError(f"the ledger {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    @contextlib.contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """The connection, holding the lock file in nfs mode; nests within one thread."""
        with self._mutex:
            if self._closed:
                raise LedgerError(f"the ledger {self.path} is closed")
            if self._depth == 0 and self.mode == "nfs":
                self._acquire_lock()
                try:
                    self._conn = self._connect()
                except BaseException:
                    self._release_lock()
                    raise
            assert self._conn is not None
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1
                if self._depth == 0 and self.mode == "nfs":
                    conn, self._conn = self._conn, None
                    try:
                        conn.close()  # flushes to the server before others may look
                    finally:
                        self._release_lock()

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; a writer takes SQLite's write lock at once (``IMMEDIATE``) so it
        never has to give up half-way because another writer got in first."""
        with self._errors(), self._session() as conn:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            # After the day's first write, not before: the copy then holds today's work too.
            # Not within _setup's migrations (nested, depth 2), which back up before they run.
            if write and self._depth == 1:
                self._backup(conn)

    def _acquire_lock(self) -> None:
        lock = self.lock_path
        content = f"{_HOST}:{os.getpid()}:{secrets.token_hex(8)}\n"
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.005
        while True:
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            except OSError as exc:
                raise LedgerError(
                    f"cannot create the ledger lock file {lock}: {exc.strerror}"
                ) from None
            else:
                try:
                    os.write(fd, content.encode())
                except OSError as exc:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        lock.unlink()
                    raise LedgerError(
                        f"cannot write the ledger lock file {lock}: {exc.strerror}"
                    ) from None
                os.close(fd)
                self._lock_content = content
                return
            try:
                seen = lock.read_text()
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released between our two looks
            except OSError as exc:
                raise LedgerError(f"cannot read the ledger lock file {lock}: {exc}") from None
            if self._is_stale(seen, age):
                self._break_lock(seen)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = seen.strip().rsplit(":", 1)[0] or "a process that is starting"
                raise LedgerError(
                    f"the ledger is locked: {lock} is held by {holder} (for {age:.0f} s); "
                    f"gave up after {self.lock_timeout:g} s",
                    hint=f"if no hpcbridge is using the ledger on that host, delete {lock}",
                )
            # Jitter keeps a crowd of waiters from retrying in step.
            time.sleep(min(remaining, delay * (0.5 + random.random())))
            delay = min(delay * 2, 0.1)

    def _is_stale(self, seen: str, age: float) -> bool:
        if age > self.stale_after:  # writes take milliseconds; nobody holds it this long
            return True
        host, _, rest = seen.strip().partition(":")
        pid = rest.partition(":")[0]
        return host == _HOST and pid.isdigit() and not _pid_alive(int(pid))

    def _break_lock(self, seen: str) -> None:
        if break_stale_lock(self.lock_path, seen, "ledger lock"):
            log.warning("took over the stale ledger lock %s (%s)", self.lock_path, seen.strip())

    def _release_lock(self) -> None:
        content, self._lock_content = self._lock_content, None
        try:
            if self.lock_path.read_text() == content:
                self.lock_path.unlink()
                return
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the ledger lock %s: %s", self.lock_path, exc)
            return
        log.warning("the ledger lock %s was taken over while this process held it", self.lock_path)

    # -- runs -------------------------------------------------------------------------------

    def _run(self, conn: sqlite3.Connection, run_id: int) -> Run:
        row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no run {run_id}", hint="`hpcbridge runs` lists the runs")
        return _run_from(row)

    def create_run(
        self,
        *,
        recipe: str,
        params: Mapping[str, Any],
        target: str,
        profile: str,
        options: Mapping[str, Any],
    ) -> Run:
        values = (
            recipe,
            _dumps(dict(params), "the recipe parameters"),
            target,
            profile,
            _dumps(dict(options), "the run options"),
            utc_stamp(),
            RunState.ACTIVE.value,
        )
        with self._tx(write=True) as conn:
            cur = conn.execute(
                "INSERT INTO runs (recipe, params, target, profile, options, created, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            assert cur.lastrowid is not None
            return self._run(conn, cur.lastrowid)

    def run(self, run_id: int) -> Run:
        with self._tx(write=False) as conn:
            return self._run(conn, run_id)

    def latest_run(self, profile: str | None = None) -> Run | None:
        where, args = ("WHERE profile = ?", (profile,)) if profile is not None else ("", ())
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs {where} ORDER BY id DESC LIMIT 1", args
            ).fetchone()
        return _run_from(row) if row else None

    def runs(self, profile: str | None = None) -> list[Run]:
        where, args = ("WHERE profile = ?", (profile,)) if profile is not None else ("", ())
        with self._tx(write=False) as conn:
            rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs {where} ORDER BY id", args)
            return [_run_from(row) for row in rows]

    def overview(
        self, profile: str | None = None, *, limit: int | None = None
    ) -> list[tuple[Run, dict[str, int], str]]:
        """Runs newest first, each with its jobs per state (as :meth:`counts`) and its last
        activity: the latest change to any of its jobs, else its creation."""
        where, args = ("WHERE profile = ?", [profile]) if profile is not None else ("", [])
        page = f" LIMIT {int(limit)}" if limit is not None else ""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs {where} ORDER BY id DESC{page}", args
            ).fetchall()
            runs = [_run_from(row) for row in rows]
            ids = [run.id for run in runs]
            per_state = conn.execute(
                "SELECT run_id, state, COUNT(*) AS n, MAX(updated_at) AS last FROM jobs"
                f" WHERE run_id IN ({', '.join('?' * len(ids))}) GROUP BY run_id, state",
                ids,
            ).fetchall()
        counts = {i: {state.value: 0 for state in JobState} for i in ids}
        last = {run.id: run.created for run in runs}
        for row in per_state:
            counts[row["run_id"]][row["state"]] = row["n"]
            last[row["run_id"]] = max(last[row["run_id"]], row["last"])
        return [(run, counts[run.id], last[run.id]) for run in runs]

    def set_run_state(self, run_id: int, state: RunState | str) -> Run:
        try:
            value = RunState(state)
        except ValueError:
            known = ", ".join(s.value for s in RunState)
            raise LedgerError(f"unknown run state {state!r}", hint=f"one of {known}") from None
        with self._tx(write=True) as conn:
            conn.execute("UPDATE runs SET state = ? WHERE id = ?", (value.value, run_id))
            return self._run(conn, run_id)

    # -- jobs -------------------------------------------------------------------------------

    def _job(self, conn: sqlite3.Connection, job_id: int) -> JobRow:
        row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise LedgerError(f"no job {job_id} in the ledger {self.path}")
        return _job_from(row)

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
        with self._tx(write=True) as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE run_id = ? AND address = ?", (run_id, address)
            ).fetchone()
            if row is not None:
                return self._job(conn, row["id"])
            self._run(conn, run_id)
            taken = conn.execute(
                "SELECT id, run_id, address FROM jobs WHERE name = ?", (name,)
            ).fetchone()
            if taken is not None:
                raise LedgerError(
                    f"job name {name!r} is already used by job {taken['id']} "
                    f"({taken['address']} in run {taken['run_id']})",
                    hint="job names must be unique in the ledger: they find submitted jobs",
                )
            cur = conn.execute(
                "INSERT INTO jobs (run_id, address, project, subject, experiment, experiment_id,"
                " scan, scan_type, name, work_dir, state, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    address,
                    project,
                    subject,
                    experiment,
                    experiment_id,
                    scan,
                    scan_type,
                    name,
                    os.fspath(work_dir) if work_dir is not None else None,
                    JobState.PLANNED.value,
                    now,
                ),
            )
            assert cur.lastrowid is not None
            conn.execute(
                "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                " VALUES (?, ?, NULL, ?, 'planned')",
                (cur.lastrowid, now, JobState.PLANNED.value),
            )
            return self._job(conn, cur.lastrowid)

    def job(self, job_id: int) -> JobRow:
        with self._tx(write=False) as conn:
            return self._job(conn, job_id)

    def job_by_name(self, name: str) -> JobRow | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE name = ?", (name,)
            ).fetchone()
        return _job_from(row) if row else None

    def jobs(self, run_id: int, states: Iterable[JobState | str] | None = None) -> list[JobRow]:
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE run_id = ?"
        args: list[Any] = [run_id]
        if isinstance(states, str):  # one state (JobState is a str too), not its letters
            states = [states]
        if states is not None:
            wanted = sorted({_job_state(s).value for s in states})
            if not wanted:
                return []
            sql += f" AND state IN ({', '.join('?' * len(wanted))})"
            args += wanted
        with self._tx(write=False) as conn:
            return [_job_from(row) for row in conn.execute(sql + " ORDER BY id", args)]

    def _set(
        self,
        conn: sqlite3.Connection,
        job_id: int,
        values: Mapping[str, Any],
        now: str,
        *,
        retry: bool = False,
    ) -> None:
        # Column names come from JOB_FIELDS and our own constants, never from callers' text.
        assignments = [f"{name} = ?" for name in values] + ["updated_at = ?"]
        if retry:
            assignments.append("attempts = attempts + 1")
        conn.execute(
            f"UPDATE jobs SET {', '.join(assignments)} WHERE id = ?",
            [*values.values(), now, job_id],
        )

    def transition(
        self, job_id: int, to: JobState | str, *, detail: str = "", **fields: Any
    ) -> JobRow:
        """Move a job to state ``to``, storing ``fields`` with it and recording the event, all
        in one transaction. Moving to the state it is in records nothing new but the fields."""
        target = _job_state(to)
        values = _encode_fields(fields)
        now = utc_stamp()
        with self._tx(write=True) as conn:
            job = self._job(conn, job_id)
            if job.state is target:
                if values:
                    self._set(conn, job_id, values, now)
                    return self._job(conn, job_id)
                return job
            if target not in TRANSITIONS[job.state]:
                allowed = ", ".join(sorted(s.value for s in TRANSITIONS[job.state])) or "none"
                raise LedgerError(
                    f"job {job_id} ({job.name}) cannot go from {job.state} to {target}",
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
            changes.update(values)
            self._set(conn, job_id, changes, now, retry=retry)
            conn.execute(
                "INSERT INTO events (job_id, at, from_state, to_state, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (job_id, now, job.state.value, target.value, detail),
            )
            return self._job(conn, job_id)

    def update(self, job_id: int, **fields: Any) -> JobRow:
        """Store ``fields`` without a change of state (and so without an event)."""
        values = _encode_fields(fields)
        with self._tx(write=True) as conn:
            self._job(conn, job_id)
            if values:
                self._set(conn, job_id, values, utc_stamp())
            return self._job(conn, job_id)

    def events(self, job_id: int) -> list[Event]:
        with self._tx(write=False) as conn:
            self._job(conn, job_id)
            rows = conn.execute(
                "SELECT id, job_id, at, from_state, to_state, detail FROM events"
                " WHERE job_id = ? ORDER BY id",
                (job_id,),
            )
            return [_event_from(row) for row in rows]

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
        wanted = json.loads(_dumps(dict(params), "the recipe parameters"))
        columns = ", ".join(f"j.{name}" for name in _JOB_COLUMN_NAMES)
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
                return _job_from(row)
        return None
