"""Resources and their files: rows in the database, bytes under ``archive/{resource id}/``.
Uploads are spooled to ``tmp/`` first and moved into place once whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .database import Database

CHUNK = 64 * 1024


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


class FileStore(Database):
    """Resources of any owner (``owner_kind``, ``owner_id``) and the files in them."""

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
        names = ("format", "content", "tags", "description")
        row = {"owner_kind": owner_kind, "owner_id": owner_id, "inout": inout, "label": label}
        rid = self.insert("resources", row | {k: fields.get(k, "") for k in names})
        return self.resource_by_id(rid) or {}

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
