"""The ledger's connection: opening the file (refusing an empty or damaged one), migrating it,
its transactions, the lock file of ``nfs`` mode, and the first write of a day's backup. The
queries are built on it (:mod:`.runs`, :mod:`.jobs`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..closing import Closing
from ..errors import LedgerError
from . import files, schema

log = logging.getLogger(__name__)

MODES = ("wal", "nfs")


def insert(conn: sqlite3.Connection, table: str, values: dict[str, Any]) -> int:
    """Insert a row of ``values`` (named by our own constants, never by callers); its id."""
    marks = ", ".join("?" * len(values))
    cur = conn.execute(
        f"INSERT INTO {table} ({', '.join(values)}) VALUES ({marks})", [*values.values()]
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


class Database(Closing):
    """The ledger file at ``path``, open in ``mode``; see :class:`~hpcbridge.ledger.Ledger`."""

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
        self._closed = False
        self._create_file()
        # Looked for while this object has no connection open, so they are not its own.
        self._found_beside = files.leftovers(self.path)
        if mode == "wal":
            files.warn_if_network(self.path)
        try:
            if mode == "wal":
                self._conn = self._connect()
            self._setup()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r})"

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            self._disconnect()

    def _create_file(self) -> None:
        """Make a new ledger if there is none; refuse an empty one.

        A new ledger appears whole (:func:`files.make_new_file`). So an existing empty file is
        never one that hpcbridge was still creating: it is a ledger that lost its content (a
        full disk, a bad copy, ``>`` in a shell), and starting afresh over it would drop its
        history without a word.
        """
        try:
            files.refuse_empty(self.path)
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
            # Creators take the lock file so that none of them removes what another just made.
            with self._lock_file():
                if not self.path.exists():
                    files.make_new_file(self.path)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger {self.path}: {exc.strerror}") from None
        except sqlite3.Error as exc:  # such as a full disk while writing the header
            raise LedgerError(f"cannot create the ledger {self.path}: {exc}") from None
        files.refuse_empty(self.path)

    def _damaged(self, reason: object) -> LedgerError:
        # Those there before this object connected, and still there: SQLite drops a WAL it
        # finds nothing in when it closes.
        beside = [name for name in self._found_beside if os.path.exists(name)]
        return files.damaged(self.path, reason, beside)

    def _connect(self) -> sqlite3.Connection:
        # nfs mode connects for every operation: the file may have been emptied or removed
        # since the last one, and SQLite would take either for a new, empty database.
        try:
            files.refuse_empty(self.path)
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
            latest = len(schema.MIGRATIONS)
            if version > latest:
                raise LedgerError(
                    f"the ledger {self.path} was made by a newer hpcbridge (schema version "
                    f"{version}, this one knows up to {latest}); upgrade hpcbridge",
                    hint="pip install --upgrade hpcbridge, or set `ledger` to another file",
                )
            self._check_whole(conn, version)
            if 0 < version < latest:
                self._backup(conn)  # an upgrade is the riskiest write a ledger sees
            wanted = "wal" if self.mode == "wal" else "delete"
            got = conn.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0]
            if str(got).lower() != wanted:
                log.warning(
                    "the ledger %s stays in journal mode %s, not %s", self.path, got, wanted
                )
            for number in range(version + 1, latest + 1):
                with self._tx(write=True) as tx:
                    schema.migrate(tx, number)

    def _check_whole(self, conn: sqlite3.Connection, version: int) -> None:
        """Refuse a ledger that lacks a table of its schema version before anything writes to
        it (a ledger cut short, SQLite refuses by itself on the first read)."""
        present = {
            str(row[0]).lower()
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = sorted(schema.tables_made_by(version) - present)
        if missing:
            raise self._damaged(
                f"it has no table {', '.join(missing)}, which its schema (version {version}) has"
            )

    def _backup(self, conn: sqlite3.Connection) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime(self._clock()))
        # Once a day per object, so a `sync --watch` that runs for a week copies every day.
        if self.keep_backups >= 1 and day != self._backup_day:
            self._backup_day = day
            files.backup(conn, self.path, day, self.keep_backups)

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
        with self._mutex, contextlib.ExitStack() as stack:
            if self._closed:
                raise LedgerError(f"the ledger {self.path} is closed")
            if self._depth == 0 and self.mode == "nfs":
                stack.enter_context(self._lock_file())
                self._conn = self._connect()
                # Closing flushes to the server, before the lock file lets others look.
                stack.callback(self._disconnect)
            assert self._conn is not None
            self._depth += 1
            try:
                yield self._conn
            finally:
                self._depth -= 1

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

    def _lock_file(self) -> contextlib.AbstractContextManager[None]:
        return files.held(self.lock_path, timeout=self.lock_timeout, stale_after=self.stale_after)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
