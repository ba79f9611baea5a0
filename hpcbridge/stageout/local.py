"""The local side of an upload: the files to send, found without following a link."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import StageError
from .refuse import (
    UPLOAD,
    Secrets,
    check_file,
    open_folder,
    open_regular,
    secret_ids,
    shown,
    subfolder,
)

CHUNK = 1024 * 1024
# Names XNAT stores and addresses verbatim (it decodes only some escapes in file paths).
SAFE_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")


@dataclass
class LocalFile:
    """A file to upload. Its md5 is computed only when needed: to compare it with a file XNAT
    already has, or on the fly while it is sent (one read of the file, not two)."""

    path: Path
    remote: str  # path inside the resource
    size: int
    md5: str | None = None
    #: (st_dev, st_ino) of the regular file that collect() checked: every later read opens the
    #: path again, and a path swapped meanwhile for a link or another file must not be read.
    identity: tuple[int, int] | None = None

    def digest(self) -> str:
        if self.md5 is None:
            digest = hashlib.md5()
            with self.open() as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
            self.md5 = digest.hexdigest()
        return self.md5

    def open(self) -> IO[bytes]:
        """The file for reading: the one collect() checked, or a StageError."""
        fd = open_regular(self.path, expect=self.identity)
        return os.fdopen(fd, "rb")


def collect(
    paths: Iterable[Path],
    *,
    secrets: Secrets | None = None,
    scope: str = UPLOAD,
) -> list[LocalFile]:
    """The files to upload: files as named, folders recursively (sub-folders kept).

    Nothing is read through a symbolic link: a link given, or found anywhere in a folder given,
    is refused, as is a FIFO, socket or device, or one of hpcbridge's own secret files
    (``secrets``, default :func:`secret_ids`), each with a StageError naming it, so that
    nothing is uploaded.
    """
    given_paths = [Path(p) for p in paths]
    if secrets is None:
        secrets = secret_ids(near={p.parent for p in given_paths})
    found: dict[str, LocalFile] = {}
    for path in given_paths:
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise StageError(f"{shown(path)}: no such file or folder") from None
        except OSError as exc:
            raise StageError(f"{shown(path)}: cannot read it: {exc.strerror}") from None
        if stat.S_ISDIR(mode):
            fd = open_folder(path, scope=scope)
            try:
                _walk(fd, path, "", found, secrets, scope)
            finally:
                os.close(fd)
        else:
            size, ident = check_file(path, secrets=secrets, scope=scope)
            _add(found, path.name, LocalFile(path, path.name, size, identity=ident))
    if not found:
        raise StageError("nothing to upload: the folders given are empty")
    return list(found.values())


def _walk(
    fd: int,
    folder: Path,
    prefix: str,
    found: dict[str, LocalFile],
    secrets: Secrets,
    scope: str,
) -> None:
    """Every file below the open folder ``fd``, through descriptors: a folder renamed and
    replaced by a link while it is walked is not followed."""
    for name in sorted(os.listdir(fd)):
        path = folder / name
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since the listing: nothing to upload
        if stat.S_ISDIR(st.st_mode):
            with subfolder(fd, name, path, scope) as sub:
                _walk(sub, path, f"{prefix}{name}/", found, secrets, scope)
            continue
        size, ident = check_file(name, dir_fd=fd, shown_as=path, secrets=secrets, scope=scope)
        _add(found, f"{prefix}{name}", LocalFile(path, f"{prefix}{name}", size, identity=ident))


def _add(found: dict[str, LocalFile], remote: str, item: LocalFile) -> None:
    if not SAFE_PATH.match(remote):
        raise StageError(
            f"{shown(item.path)}: the name {remote!r} has characters XNAT cannot address reliably",
            hint="rename it to letters, digits, '.', '_', '-' and '+'",
        )
    there = found.get(remote)
    if there is not None and there.path != item.path:
        raise StageError(
            f"two files would both be uploaded as {remote!r}: {there.path} and {item.path}"
        )
    found[remote] = item
