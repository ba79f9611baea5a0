"""The ledger's files: where it lives, how a new one appears whole, its daily checked copies,
and the errors that point to the last good copy when the file is empty or damaged."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LedgerError

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

# File systems where WAL's shared-memory index is not shared between hosts.
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph")


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


def warn_if_network(path: Path) -> None:
    """WAL mode on a network file system corrupts the ledger once two hosts use it."""
    fstype = filesystem_type(path.parent)
    if fstype and fstype.split(".")[-1] in _NETWORK_FS:
        log.warning(
            'the ledger %s is on %s: set ledger_mode = "nfs" if hpcbridge may run on '
            "more than one host (WAL needs memory shared between all its users)",
            path,
            fstype,
        )


def leftovers(path: Path) -> list[str]:
    """The journal and WAL beside the ledger at ``path``."""
    beside = [path.with_name(path.name + suffix) for suffix in ("-wal", "-journal")]
    return [str(p) for p in beside if p.exists()]


def _restore(path: Path, what: str, beside: list[str]) -> str | None:
    """How to put the last good copy of the ledger back, if there is one."""
    backups = ledger_backups(path)
    if not backups:
        return None
    # A journal or WAL left by the lost file would be replayed into the copy put back (a new
    # ledger removes them itself).
    before_cp = f"; before the `cp`, delete {' and '.join(beside)}" if beside else ""
    return (
        f"the last good copy is {backups[-1]}: `cp` it back, or move the {what} file away to "
        f"start afresh{before_cp}"
    )


def refuse_empty(path: Path) -> None:
    """Raise if the ledger file is empty; FileNotFoundError if there is none."""
    if path.stat().st_size > 0:
        return
    if restore := _restore(path, "empty", leftovers(path)):
        raise LedgerError(
            f"the ledger {path} is empty (0 bytes) but this machine has used it "
            "before; refusing to start a new one over it",
            hint=restore,
        )
    raise LedgerError(
        f"the ledger {path} is empty (0 bytes): what it held is lost; refusing to "
        "start a new one over it",
        hint=f"there is no copy of it in {backup_folder(path)}: move the empty file "
        "away to start afresh",
    )


def damaged(path: Path, reason: object, beside: list[str]) -> LedgerError:
    """The error for a ledger SQLite cannot use, naming the last good copy if there is one."""
    restore = _restore(path, "damaged", beside)
    return LedgerError(
        f"the ledger {path} cannot be used: {reason}",
        hint=f"it is damaged or not a ledger; {restore}"
        if restore
        else "if it is not a ledger or is damaged, move it aside to start a new one",
    )


def make_new_file(path: Path) -> None:
    """Create an empty ledger at ``path`` (the caller holds the lock file): made as a temporary
    file, then linked into place, so a ledger file is never one still being created."""
    prefix = f".{path.name}.new-"
    for entry in os.scandir(path.parent):
        if entry.name.startswith(prefix):  # a creator killed half-way; we hold the lock
            Path(entry.path).unlink(missing_ok=True)
    # A journal or WAL whose database is gone would be replayed into the new file.
    for suffix in ("-wal", "-journal", "-shm"):
        orphan = path.with_name(path.name + suffix)
        if orphan.exists():
            log.warning("removing %s: the ledger it belonged to no longer exists", orphan)
            orphan.unlink(missing_ok=True)
    temp = path.with_name(f"{prefix}{secrets.token_hex(4)}")
    # SQLite gives its journal the database's permissions, so this covers those too.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        with contextlib.closing(sqlite3.connect(temp, isolation_level=None)) as conn:
            # Writes the header, so the file is a database (of schema version 0, which
            # the ledger migrates) from the moment it has the ledger's name.
            conn.execute("PRAGMA user_version = 0")
        try:
            os.link(temp, path)  # unlike rename, never replaces a file made meanwhile
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            os.rename(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def backup(conn: sqlite3.Connection, path: Path, day: str, keep: int) -> None:
    """Copy the ledger open as ``conn`` into the backup folder unless ``day``'s copy (or a later
    one: the clock went back) is there, then keep the newest ``keep``. Never fails the
    operation: a backup is a precaution."""
    folder = backup_folder(path)
    final = folder / f"{path.stem}-{day}{path.suffix}"
    existing = ledger_backups(path)
    if existing and existing[-1].name >= final.name:  # names sort by day
        return
    temp = folder / f".{final.name}.new-{secrets.token_hex(4)}"
    try:
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            folder.chmod(0o700)  # as private as the ledger it copies
        verdict = _copy(conn, temp)
        if verdict != ["ok"]:
            log.warning(
                "the ledger %s fails SQLite's quick_check (%s); not backed up, the last good "
                "copy stays %s",
                path,
                "; ".join(verdict[:3]),
                existing[-1] if existing else "(none)",
            )
            return
        os.replace(temp, final)
        for old in ledger_backups(path)[:-keep]:
            old.unlink(missing_ok=True)
    except (OSError, sqlite3.Error) as exc:
        log.warning("could not back up the ledger %s to %s: %s", path, folder, exc)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def _copy(conn: sqlite3.Connection, temp: Path) -> list[str]:
    """Copy the database into the new file ``temp``; SQLite's quick_check of the copy."""
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with contextlib.closing(sqlite3.connect(temp, isolation_level=None)) as copy:
        conn.backup(copy)
        # The copy is put back with `cp`: in rollback mode it needs no -wal beside it.
        copy.execute("PRAGMA journal_mode = delete")
        # The backup API copies pages as they are, so a damaged ledger gives a damaged
        # copy: checked here, it never joins (or rotates away) the good ones.
        return [row[0] for row in copy.execute("PRAGMA quick_check")]
