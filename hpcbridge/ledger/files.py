"""The ledger's files: where it lives, how a new one appears whole, its daily checked copies,
the errors that point to the last good copy when the file is empty or damaged, and the lock file
of ``nfs`` mode: made with ``O_CREAT|O_EXCL`` (atomic on NFS even where its byte range locks are
broken or local to one host), holding ``host:pid:token``, taken over when stale. The run locks
(:mod:`hpcbridge.runlock`) share its helpers."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
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


def _before_cp(beside: list[str]) -> str:
    # A journal or WAL left by the lost file would be replayed into the copy put back (a new
    # ledger removes them itself).
    return f"; before the `cp`, delete {' and '.join(beside)}" if beside else ""


def refuse_empty(path: Path) -> None:
    """Raise if the ledger file is empty; FileNotFoundError if there is none."""
    if path.stat().st_size > 0:
        return
    if backups := ledger_backups(path):
        raise LedgerError(
            f"the ledger {path} is empty (0 bytes) but this machine has used it "
            "before; refusing to start a new one over it",
            hint=f"the last good copy is {backups[-1]}: `cp` it back, or move the empty file "
            f"away to start afresh{_before_cp(leftovers(path))}",
        )
    raise LedgerError(
        f"the ledger {path} is empty (0 bytes): what it held is lost; refusing to "
        "start a new one over it",
        hint=f"there is no copy of it in {backup_folder(path)}: move the empty file "
        "away to start afresh",
    )


def damaged(path: Path, reason: object, beside: list[str]) -> LedgerError:
    """The error for a ledger SQLite cannot use, naming the last good copy if there is one."""
    if backups := ledger_backups(path):
        hint = (
            f"it is damaged or not a ledger; the last good copy is {backups[-1]}: `cp` it "
            f"back, or move the damaged file away to start afresh{_before_cp(beside)}"
        )
    else:
        hint = "if it is not a ledger or is damaged, move it aside to start a new one"
    return LedgerError(f"the ledger {path} cannot be used: {reason}", hint=hint)


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
    try:
        with _new_database(temp) as conn:
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


def _new_database(path: Path) -> contextlib.closing[sqlite3.Connection]:
    # SQLite gives its journal the database's permissions, so this covers those too.
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


def _copy(conn: sqlite3.Connection, temp: Path) -> list[str]:
    """Copy the database into the new file ``temp``; SQLite's quick_check of the copy."""
    with _new_database(temp) as copy:
        conn.backup(copy)
        # The copy is put back with `cp`: in rollback mode it needs no -wal beside it.
        copy.execute("PRAGMA journal_mode = delete")
        # The backup API copies pages as they are, so a damaged ledger gives a damaged
        # copy: checked here, it never joins (or rotates away) the good ones.
        return [row[0] for row in copy.execute("PRAGMA quick_check")]


HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def break_stale_lock(lock: Path, seen: str, what: str) -> bool:
    """Remove the lock file ``lock`` that held ``seen`` when found stale; whether it was ours
    to remove. Renaming is atomic, so of several processes breaking one stale lock only one
    wins; a loser that moved a fresh lock taken meanwhile instead links it back in place."""
    grave = lock.with_name(f"{lock.name}.{HOST}.{os.getpid()}.stale")
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


def acquire(lock: Path, *, timeout: float, stale_after: float) -> str:
    """Take the ledger's lock file ``lock``, waiting up to ``timeout`` seconds for a live holder;
    the content that marks it as ours."""
    content = f"{HOST}:{os.getpid()}:{secrets.token_hex(8)}\n"
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not _create(lock, content):
        found = look(lock, "ledger lock file")
        if found is None:
            continue  # released between our two looks
        seen, age = found
        if _is_stale(seen, age, stale_after):
            if break_stale_lock(lock, seen, "ledger lock"):
                log.warning("took over the stale ledger lock %s (%s)", lock, seen.strip())
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            holder = seen.strip().rsplit(":", 1)[0] or "a process that is starting"
            raise LedgerError(
                f"the ledger is locked: {lock} is held by {holder} (for {age:.0f} s); "
                f"gave up after {timeout:g} s",
                hint=f"if no hpcbridge is using the ledger on that host, delete {lock}",
            )
        # Jitter keeps a crowd of waiters from retrying in step.
        time.sleep(min(remaining, delay * (0.5 + random.random())))
        delay = min(delay * 2, 0.1)
    return content


def _create(lock: Path, content: str) -> bool:
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot create the ledger lock file {lock}: {exc.strerror}") from None
    try:
        os.write(fd, content.encode())
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink()
        raise LedgerError(f"cannot write the ledger lock file {lock}: {exc.strerror}") from None
    os.close(fd)
    return True


def _is_stale(seen: str, age: float, stale_after: float) -> bool:
    if age > stale_after:  # writes take milliseconds; nobody holds it this long
        return True
    host, _, rest = seen.strip().partition(":")
    pid = rest.partition(":")[0]
    return host == HOST and pid.isdigit() and not pid_alive(int(pid))


@contextlib.contextmanager
def held(lock: Path, *, timeout: float, stale_after: float) -> Iterator[None]:
    """Hold the ledger's lock file ``lock`` (see :func:`acquire`) for the ``with`` block."""
    content = acquire(lock, timeout=timeout, stale_after=stale_after)
    try:
        yield
    finally:
        if not remove_if_ours(lock, lambda seen: seen == content, "ledger lock"):
            log.warning("the ledger lock %s was taken over while this process held it", lock)


def look(lock: Path, what: str) -> tuple[str, float] | None:
    """What the lock file ``lock`` holds and its age in seconds; None if there is none."""
    try:
        return lock.read_text(), time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LedgerError(f"cannot read the {what} {lock}: {exc}") from None


def remove_if_ours(lock: Path, ours: Callable[[str], bool], what: str) -> bool:
    """Remove ``lock`` if ``ours`` says its content is this process's; False when another
    process has taken it over (the caller says so: in its own words)."""
    try:
        if ours(lock.read_text()):
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the %s %s: %s", what, lock, exc)
        return True
    return False
