"""The staging tree, shared by every stage-in into the same destination.

A chain's stage-in jobs run at once, on several nodes, into one work root: each download gets a
folder of its own under the scan's, named so that no other process (here or on another host)
can pick the same, and each process removes only its own folder. Parents are removed only when
empty, and a sibling may create or remove them at any moment.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from .layout import safe_name

_HOST = safe_name(socket.gethostname()).replace("-", "_")
MKDIR_ATTEMPTS = 5
ABANDONED_SECONDS = 2 * 24 * 3600.0


def _own_name() -> str:
    """``<host>-<pid>-<random>``: unique among processes sharing a file system."""
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_own_folder(parent: Path) -> Path:
    """A new folder of this process's under ``parent``."""
    for attempt in range(MKDIR_ATTEMPTS + 1):
        folder = parent / _own_name()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            return folder
        except FileNotFoundError:
            # a sibling's clean-up removed an empty parent in between: make it again
            if attempt == MKDIR_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _remove_own_folder(folder: Path, top: Path) -> None:
    """Remove ``folder`` (this process's), then its parents up to ``top`` while empty."""
    shutil.rmtree(folder, ignore_errors=True)
    path = folder.parent
    while path == top or top in path.parents:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (a sibling's folder is in it), or already gone
        path = path.parent


def _remove_abandoned(parent: Path) -> None:
    """Remove what dead processes left under ``parent`` (a killed job's folder): those of this
    host whose process is gone, and anything untouched for ``ABANDONED_SECONDS`` (another
    host's processes cannot be checked from here, but no download lasts that long)."""
    try:
        names = [entry.name for entry in os.scandir(parent)]
    except OSError:
        return
    for name in names:
        path = parent / name
        host, _, pid = name.rpartition("-")[0].rpartition("-")
        if host == _HOST and pid.isdigit():
            if _alive(int(pid)):
                continue
        elif _last_change(path) > time.time() - ABANDONED_SECONDS:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _last_change(path: Path) -> float:
    """The newest modification time in the tree at ``path`` (now, if it cannot be read)."""
    try:
        newest = path.lstat().st_mtime
        for folder, _dirs, files in os.walk(path):
            for name in files:
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    except OSError:
        return time.time()
    return newest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process
        return True
    return True


def _place(built: Path, final: Path) -> None:
    """Swap the finished folder into place; an old copy is replaced only once the new is whole.

    Another process staging the same scan at the same time (an overlapping retry) may put its
    copy in place between the two renames; that copy was verified against the same listing, so
    it is kept and this one dropped.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(f".{final.name}.old-{_own_name()}")
    try:
        os.rename(final, old)
    except FileNotFoundError:
        pass
    try:
        os.rename(built, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(built, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
