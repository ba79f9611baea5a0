"""The sandbox's archive: metadata in SQLite, file bytes on disk under the data folder.

Everything a restart must keep lives here (projects down to files, alias tokens, workflows);
server sessions do not, exactly as a Tomcat restart logs everyone out. One connection is shared by
the server's threads behind a lock: the sandbox serves tests and demos, not a hospital.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

SITE_ID = "XNAT"
CHUNK = 64 * 1024

# XNAT's own rule for IDs and what its UI allows in labels (XftStringUtils.REGEX_VALID_ID).
VALID_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")

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


def now_stamp() -> str:
    """XNAT's insert_date format: ``YYYY-MM-DD HH:MM:SS.mmm``."""
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


@dataclass(frozen=True)
class StoredFile:
    resource_id: int
    path: str
    size: int
    digest: str
    mtime: float
    format: str = ""
    content: str = ""
    tags: str = ""

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


class PathRefused(ValueError):
    """A file path that would escape its resource folder."""


def safe_relpath(path: str) -> str:
    """Normalise a resource-relative path; refuse absolute paths, ``..`` and empty names."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or path.startswith("/"):
        raise PathRefused(path)
    return "/".join(parts)


class Store:
    """Thread-safe archive. Row dicts use the column names of the tables above."""

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

    # -- low level -------------------------------------------------------------------------
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

    def _next_id(self, db: sqlite3.Connection, kind: str) -> str:
        key = f"next_{kind}"
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        n = int(row[0]) if row else 1
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, str(n + 1)))
        return f"{SITE_ID}_{kind}{n:05d}"

    # -- projects, subjects, experiments, scans, assessors ---------------------------------
    def projects(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM projects ORDER BY id")

    def project(self, ident: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM projects WHERE id=? OR secondary_id=?", (ident, ident))

    def create_project(self, pid: str, user: str, **fields: str) -> dict[str, Any]:
        cols = ["secondary_id", "name", "description", "pi_firstname", "pi_lastname"]
        vals = [fields.get(c, "") for c in cols]
        with self.transaction() as db:
            db.execute(
                f"INSERT INTO projects(id, {', '.join(cols)}, insert_date, insert_user)"
                " VALUES(?,?,?,?,?,?,?,?)",
                (pid, *vals, now_stamp(), user),
            )
        return self.project(pid) or {}

    def subjects(self, project: str | None = None) -> list[dict[str, Any]]:
        if project is None:
            return self.query("SELECT * FROM subjects ORDER BY id")
        return self.query("SELECT * FROM subjects WHERE project=? ORDER BY label", (project,))

    def subject(self, ident: str, project: str | None = None) -> dict[str, Any] | None:
        if project is None:
            return self.one("SELECT * FROM subjects WHERE id=?", (ident,))
        return self.one(
            "SELECT * FROM subjects WHERE project=? AND (label=? OR id=?)", (project, ident, ident)
        )

    def create_subject(
        self, project: str, label: str, user: str, gender: str = ""
    ) -> dict[str, Any]:
        with self.transaction() as db:
            sid = self._next_id(db, "S")
            db.execute(
                "INSERT INTO subjects(id, project, label, gender, insert_date, insert_user)"
                " VALUES(?,?,?,?,?,?)",
                (sid, project, label, gender, now_stamp(), user),
            )
        return self.subject(sid) or {}

    def experiments(
        self, project: str | None = None, subject_id: str | None = None
    ) -> list[dict[str, Any]]:
        sql = (
            "SELECT e.*, s.label AS subject_label FROM experiments e"
            " JOIN subjects s ON s.id = e.subject_id WHERE 1=1"
        )
        args: list[Any] = []
        if project is not None:
            sql += " AND e.project=?"
            args.append(project)
        if subject_id is not None:
            sql += " AND e.subject_id=?"
            args.append(subject_id)
        return self.query(sql + " ORDER BY e.label", tuple(args))

    def experiment(
        self, ident: str, project: str | None = None, subject_id: str | None = None
    ) -> dict[str, Any] | None:
        sql = (
            "SELECT e.*, s.label AS subject_label FROM experiments e"
            " JOIN subjects s ON s.id = e.subject_id WHERE "
        )
        if project is None:
            return self.one(sql + "e.id=?", (ident,))
        row = self.one(sql + "e.project=? AND (e.label=? OR e.id=?)", (project, ident, ident))
        if row and subject_id is not None and row["subject_id"] != subject_id:
            return None
        return row

    def create_experiment(
        self, project: str, subject_id: str, label: str, xsi_type: str, user: str, date: str = ""
    ) -> dict[str, Any]:
        with self.transaction() as db:
            eid = self._next_id(db, "E")
            db.execute(
                "INSERT INTO experiments(id, project, subject_id, label, xsi_type, date,"
                " insert_date, insert_user) VALUES(?,?,?,?,?,?,?,?)",
                (eid, project, subject_id, label, xsi_type, date, now_stamp(), user),
            )
        return self.experiment(eid) or {}

    def update_experiment(self, eid: str, **fields: str) -> None:
        for key, value in fields.items():
            if key in ("date", "label"):
                with self.transaction() as db:
                    db.execute(f"UPDATE experiments SET {key}=? WHERE id=?", (value, eid))

    def scans(self, experiment_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM scans WHERE experiment_id=?", (experiment_id,))
        return sorted(rows, key=lambda r: _natural_key(r["scan_id"]))

    def scan(self, experiment_id: str, scan_id: str) -> dict[str, Any] | None:
        return self.one(
            "SELECT * FROM scans WHERE experiment_id=? AND scan_id=?", (experiment_id, scan_id)
        )

    def put_scan(
        self, experiment_id: str, scan_id: str, xsi_type: str, **fields: str
    ) -> dict[str, Any]:
        cols = [
            c for c in ("type", "series_description", "quality", "note", "frames") if c in fields
        ]
        with self.transaction() as db:
            if (
                db.execute(
                    "SELECT 1 FROM scans WHERE experiment_id=? AND scan_id=?",
                    (experiment_id, scan_id),
                ).fetchone()
                is None
            ):
                db.execute(
                    "INSERT INTO scans(experiment_id, scan_id, xsi_type) VALUES(?,?,?)",
                    (experiment_id, scan_id, xsi_type),
                )
            for col in cols:
                db.execute(
                    f"UPDATE scans SET {col}=? WHERE experiment_id=? AND scan_id=?",
                    (fields[col], experiment_id, scan_id),
                )
        return self.scan(experiment_id, scan_id) or {}

    def assessors(self, experiment_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM assessors WHERE experiment_id=? ORDER BY label", (experiment_id,)
        )

    def assessor(self, experiment_id: str, ident: str) -> dict[str, Any] | None:
        return self.one(
            "SELECT * FROM assessors WHERE experiment_id=? AND (id=? OR label=?)",
            (experiment_id, ident, ident),
        )

    def create_assessor(
        self, experiment: dict[str, Any], label: str, xsi_type: str, user: str
    ) -> dict[str, Any]:
        with self.transaction() as db:
            aid = self._next_id(db, "E")
            db.execute(
                "INSERT INTO assessors(id, experiment_id, project, label, xsi_type, insert_date,"
                " insert_user) VALUES(?,?,?,?,?,?,?)",
                (aid, experiment["id"], experiment["project"], label, xsi_type, now_stamp(), user),
            )
        return self.assessor(experiment["id"], aid) or {}

    def delete_owner(self, kind: str, ident: str) -> None:
        """Delete an object, everything below it, and their files."""
        children: list[tuple[str, str]] = []
        if kind == "project":
            children = [("subject", r["id"]) for r in self.subjects(ident)]
        elif kind == "subject":
            children = [("experiment", r["id"]) for r in self.experiments(subject_id=ident)]
        elif kind == "experiment":
            children = [("scan", str(r["pk"])) for r in self.scans(ident)]
            children += [("assessor", r["id"]) for r in self.assessors(ident)]
        for child in children:
            self.delete_owner(*child)
        for res in self.resources(kind, ident, inout=None):
            self.delete_resource(res["id"])
        table, col = {
            "project": ("projects", "id"),
            "subject": ("subjects", "id"),
            "experiment": ("experiments", "id"),
            "scan": ("scans", "pk"),
            "assessor": ("assessors", "id"),
        }[kind]
        with self.transaction() as db:
            db.execute(f"DELETE FROM {table} WHERE {col}=?", (ident,))

    # -- resources and files ---------------------------------------------------------------
    def resources(
        self, owner_kind: str, owner_id: str, inout: str | None = ""
    ) -> list[dict[str, Any]]:
        if inout is None:
            return self.query(
                "SELECT * FROM resources WHERE owner_kind=? AND owner_id=? ORDER BY id",
                (owner_kind, owner_id),
            )
        return self.query(
            "SELECT * FROM resources WHERE owner_kind=? AND owner_id=? AND inout=? ORDER BY id",
            (owner_kind, owner_id, inout),
        )

    def resource_by_id(self, rid: int) -> dict[str, Any] | None:
        return self.one("SELECT * FROM resources WHERE id=?", (rid,))

    def create_resource(
        self, owner_kind: str, owner_id: str, label: str, inout: str = "", **fields: str
    ) -> dict[str, Any]:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO resources(owner_kind, owner_id, inout, label, format, content, tags,"
                " description) VALUES(?,?,?,?,?,?,?,?)",
                (
                    owner_kind,
                    owner_id,
                    inout,
                    label,
                    fields.get("format", ""),
                    fields.get("content", ""),
                    fields.get("tags", ""),
                    fields.get("description", ""),
                ),
            )
            rid = cur.lastrowid
        return self.resource_by_id(int(rid or 0)) or {}

    def delete_resource(self, rid: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE resource_id=?", (rid,))
            db.execute("DELETE FROM resources WHERE id=?", (rid,))
        shutil.rmtree(self.files_dir / str(rid), ignore_errors=True)

    def resource_stats(self, rid: int) -> tuple[int, int]:
        row = self.one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS total FROM files WHERE resource_id=?",
            (rid,),
        )
        assert row is not None
        return int(row["n"]), int(row["total"])

    def files(self, rid: int) -> list[StoredFile]:
        rows = self.query("SELECT * FROM files WHERE resource_id=? ORDER BY path", (rid,))
        return [StoredFile(**r) for r in rows]

    def file(self, rid: int, path: str) -> StoredFile | None:
        row = self.one("SELECT * FROM files WHERE resource_id=? AND path=?", (rid, path))
        return StoredFile(**row) if row else None

    def file_path(self, rid: int, path: str) -> Path:
        return self.files_dir / str(rid) / safe_relpath(path)

    def spool(self, stream: IO[bytes] | Iterator[bytes]) -> tuple[Path, int, str]:
        """Copy a body to a temporary file in fixed-size chunks; return (path, size, md5)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="upload-")
        md5 = hashlib.md5()
        size = 0
        chunks = iter(lambda: stream.read(CHUNK), b"") if hasattr(stream, "read") else stream
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:  # type: ignore[union-attr]
                    out.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
        except BaseException:
            os.unlink(name)
            raise
        return Path(name), size, md5.hexdigest()

    def add_file(
        self,
        rid: int,
        path: str,
        spooled: tuple[Path, int, str],
        *,
        overwrite: bool,
        format: str = "",
        content: str = "",
        tags: str = "",
    ) -> bool:
        """Move a spooled upload into place. False (and nothing changed) for a kept duplicate."""
        tmp, size, digest = spooled
        rel = safe_relpath(path)
        with self.transaction() as db:
            exists = db.execute(
                "SELECT 1 FROM files WHERE resource_id=? AND path=?", (rid, rel)
            ).fetchone()
            if exists and not overwrite:
                tmp.unlink(missing_ok=True)
                return False
            target = self.file_path(rid, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            db.execute(
                "INSERT OR REPLACE INTO files(resource_id, path, size, digest, mtime, format,"
                " content, tags) VALUES(?,?,?,?,?,?,?,?)",
                (rid, rel, size, digest, time.time(), format, content, tags),
            )
        return True

    def delete_files(self, rid: int, paths: list[str]) -> None:
        with self.transaction() as db:
            for path in paths:
                db.execute("DELETE FROM files WHERE resource_id=? AND path=?", (rid, path))
        for path in paths:
            self.file_path(rid, path).unlink(missing_ok=True)

    # -- alias tokens ----------------------------------------------------------------------
    def add_token(
        self, alias: str, secret: str, login: str, created: int, expires: int
    ) -> dict[str, Any]:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tokens(alias, secret, login, created, expires) VALUES(?,?,?,?,?)",
                (alias, secret, login, created, expires),
            )
        return self.token(alias) or {}

    def token(self, alias: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM tokens WHERE alias=?", (alias,))

    def tokens_of(self, login: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM tokens WHERE login=? ORDER BY id", (login,))

    def delete_token(self, alias: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE alias=?", (alias,))

    # -- workflows -------------------------------------------------------------------------
    def workflows(self, **match: Any) -> list[dict[str, Any]]:
        sql = "SELECT * FROM workflows WHERE 1=1"
        args: list[Any] = []
        for key, value in match.items():
            sql += f" AND {key}=?"
            args.append(value)
        return self.query(sql + " ORDER BY wrk_id", tuple(args))

    def save_workflow(self, row: dict[str, Any]) -> dict[str, Any]:
        cols = [
            "id",
            "data_type",
            "pipeline_name",
            "launch_time",
            "status",
            "scan_id",
            "fields",
            "create_user",
        ]
        with self.transaction() as db:
            if row.get("wrk_id"):
                db.execute(
                    f"UPDATE workflows SET {', '.join(c + '=?' for c in cols)} WHERE wrk_id=?",
                    (*[row.get(c, "") for c in cols], row["wrk_id"]),
                )
                wid = row["wrk_id"]
            else:
                cur = db.execute(
                    f"INSERT INTO workflows({', '.join(cols)})"
                    f" VALUES({', '.join('?' * len(cols))})",
                    tuple(row.get(c, "") for c in cols),
                )
                wid = cur.lastrowid
        return self.workflows(wrk_id=wid)[0]


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort scan IDs as numbers where they are numbers ('2' before '10')."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))
