"""The sandbox's SQLite database: its schema, one connection shared by the server's threads
behind a lock (the sandbox serves tests and demos, not a hospital), and the queries and
transactions the stores above it are written with.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SITE_ID = "XNAT"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS projects(
    id TEXT PRIMARY KEY, secondary_id TEXT DEFAULT '', name TEXT DEFAULT '',
    description TEXT DEFAULT '', pi_firstname TEXT DEFAULT '', pi_lastname TEXT DEFAULT '',
    insert_date TEXT, insert_user TEXT);
CREATE TABLE IF NOT EXISTS subjects(
    id TEXT PRIMARY KEY, project TEXT, label TEXT, gender TEXT DEFAULT '',
    insert_date TEXT, insert_user TEXT, UNIQUE(project, label));
CREATE TABLE IF NOT EXISTS experiments(
    id TEXT PRIMARY KEY, project TEXT, subject_id TEXT, label TEXT, xsi_type TEXT,
    date TEXT DEFAULT '', insert_date TEXT, insert_user TEXT, UNIQUE(project, label));
CREATE TABLE IF NOT EXISTS scans(
    pk INTEGER PRIMARY KEY AUTOINCREMENT, experiment_id TEXT, scan_id TEXT, xsi_type TEXT,
    type TEXT DEFAULT '', series_description TEXT DEFAULT '', quality TEXT DEFAULT 'usable',
    note TEXT DEFAULT '', frames TEXT DEFAULT '', UNIQUE(experiment_id, scan_id));
CREATE TABLE IF NOT EXISTS assessors(
    id TEXT PRIMARY KEY, experiment_id TEXT, project TEXT, label TEXT, xsi_type TEXT,
    insert_date TEXT, insert_user TEXT, UNIQUE(experiment_id, label));
CREATE TABLE IF NOT EXISTS resources(
    id INTEGER PRIMARY KEY AUTOINCREMENT, owner_kind TEXT, owner_id TEXT, inout TEXT DEFAULT '',
    label TEXT, format TEXT DEFAULT '', content TEXT DEFAULT '', tags TEXT DEFAULT '',
    description TEXT DEFAULT '', UNIQUE(owner_kind, owner_id, inout, label));
CREATE TABLE IF NOT EXISTS files(
    resource_id INTEGER, path TEXT, size INTEGER, digest TEXT, mtime REAL,
    format TEXT DEFAULT '', content TEXT DEFAULT '', tags TEXT DEFAULT '',
    PRIMARY KEY(resource_id, path));
CREATE TABLE IF NOT EXISTS tokens(
    id INTEGER PRIMARY KEY AUTOINCREMENT, alias TEXT UNIQUE, secret TEXT, login TEXT,
    created INTEGER, expires INTEGER);
CREATE TABLE IF NOT EXISTS workflows(
    wrk_id INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, data_type TEXT, pipeline_name TEXT,
    launch_time TEXT, status TEXT DEFAULT '', scan_id TEXT DEFAULT '', fields TEXT DEFAULT '{}',
    create_user TEXT, UNIQUE(id, scan_id, pipeline_name, launch_time));
"""


class Database:
    """The database of a data folder, which also holds the files (``archive/``) and uploads
    being received (``tmp/``)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.files_dir = self.data_dir / "archive"
        self.tmp_dir = self.data_dir / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            str(self.data_dir / "sandbox.db"), check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        # One fsync per committed file made seeding and uploads disk-bound; WAL with
        # synchronous=NORMAL still survives a killed process (only an OS crash may lose the
        # last commits), which is all a test server needs.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def insert(self, table: str, row: dict[str, Any]) -> int:
        """Insert one row in its own transaction; returns its rowid."""
        with self.transaction() as db:
            return insert(db, table, row)

    def insert_with_id(self, kind: str, table: str, row: dict[str, Any]) -> str:
        """Insert a row under the next accession ID of ``kind`` (``XNAT_S00001``); returns it."""
        with self.transaction() as db:
            key = f"next_{kind}"
            found = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            n = int(found[0]) if found else 1
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, str(n + 1)))
            ident = f"{SITE_ID}_{kind}{n:05d}"
            insert(db, table, {"id": ident, **row})
        return ident


def insert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> int:
    marks = ", ".join("?" * len(row))
    cur = db.execute(f"INSERT INTO {table}({', '.join(row)}) VALUES({marks})", tuple(row.values()))
    return int(cur.lastrowid or 0)
