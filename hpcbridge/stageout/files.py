"""The files of an upload: regular files only, never read through a link, never a secret.

A job's output folder is written by whatever the job ran, and some tools link their inputs into
it. Reading through such a link would upload whatever it points to: another user-owned file, or
hpcbridge's own credentials. So nothing is opened through a link: entries are judged by lstat,
files opened with O_NOFOLLOW, and the opened descriptor (not the name) is checked to be the
regular file judged. O_NONBLOCK keeps a FIFO from blocking the open forever; a regular file
ignores it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..config import default_home
from ..credentials import secret_files
from ..errors import StageError

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: What a refusal says is not uploaded either: nothing of the files given (a run says "of this
#: scan").
UPLOAD = "given"

_KINDS = [
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISCHR, "a character device"),
]


class RefusedFileError(StageError):
    """A file that must not be uploaded: a symbolic link, a FIFO, socket or device, or one of
    hpcbridge's secrets. Retrying finds the same, so a run fails the scan at once."""


def shown(path: object) -> str:
    """A path for a one-line message: as is, or quoted when it holds a newline or the like."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def refusal(path: object, what: str, scope: str = UPLOAD) -> RefusedFileError:
    """The error for an output that must not be read: ``what`` says what it is."""
    return RefusedFileError(
        f"{shown(path)} is {what}; refusing to upload it or anything else {scope}"
    )


def kind_of(mode: int) -> str | None:
    """What a non-regular, non-folder entry is, in words; None for files and folders."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def link_refusal(path: object, target: str | None, scope: str = UPLOAD) -> RefusedFileError:
    to = f" (to {shown(target)})" if target is not None else ""
    return refusal(path, f"a symbolic link{to}", scope)


def replaced(path: object) -> RefusedFileError:
    """The error for a file swapped (for a link, say) between its check and its reading."""
    return RefusedFileError(f"{shown(path)} was replaced after it was checked; refusing to read it")


def read_link(name: str | Path, dir_fd: int | None = None) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _refuse_entry(
    mode: int, path: object, name: str | Path, dir_fd: int | None, scope: str
) -> None:
    """A StageError for a link or special file (lstat's ``mode``); nothing for the rest."""
    what = kind_of(mode)
    if what is None:
        return
    if stat.S_ISLNK(mode):
        raise link_refusal(path, read_link(name, dir_fd), scope)
    raise refusal(path, what, scope)


def open_regular(
    path: Path | str,
    *,
    dir_fd: int | None = None,
    expect: tuple[int, int] | None = None,
    shown_as: object = None,
    scope: str = UPLOAD,
) -> int:
    """A descriptor of the regular file at ``path`` (relative to ``dir_fd``), opened without
    following a link; with ``expect``, only if it is still that (st_dev, st_ino)."""
    label = path if shown_as is None else shown_as
    try:
        fd = os.open(path, _READ, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_refusal(label, read_link(path, dir_fd), scope) from None
        raise StageError(f"{shown(label)}: cannot read it: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        what = kind_of(st.st_mode)
        if what is not None or stat.S_ISDIR(st.st_mode):
            raise refusal(label, what or "a folder", scope)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            raise replaced(label)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_folder(path: Path, *, below: Path | None = None, scope: str = UPLOAD) -> int:
    """A descriptor of the folder ``path``, refusing it if it is a link; with ``below`` (an
    ancestor), refusing a link anywhere between the two. ``below`` itself may be reached
    through links: it is configured (a work_root on a linked /scratch is common)."""
    if below is None or path == below or not path.is_relative_to(below):
        try:
            return os.open(path, _FOLDER)
        except OSError as exc:
            raise _not_a_folder(path, path, None, exc, scope) from None
    try:
        fd = os.open(below, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StageError(f"{shown(below)}: cannot open the folder: {exc.strerror}") from None
    here = below
    for part in path.relative_to(below).parts:
        here = here / part
        try:
            nxt = os.open(part, _FOLDER, dir_fd=fd)
        except OSError as exc:
            raise _not_a_folder(part, here, fd, exc, scope) from None
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _not_a_folder(
    name: str | Path, path: Path, dir_fd: int | None, exc: OSError, scope: str
) -> StageError:
    """Why a folder could not be opened without following a link."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return StageError(f"{shown(path)}: no such folder")
    except OSError:
        mode = stat.S_IFDIR
    if stat.S_ISLNK(mode):
        return link_refusal(path, read_link(name, dir_fd), scope)
    what = kind_of(mode)
    if what is not None:
        return refusal(path, what, scope)
    if not stat.S_ISDIR(mode):
        return StageError(f"{shown(path)}: not a folder")
    return StageError(f"{shown(path)}: cannot open the folder: {exc.strerror}")


#: Files that hold secrets, by (st_dev, st_ino): compared by identity, not by name, so that a
#: hard link to one is recognised too.
Secrets = dict[tuple[int, int], Path]


def secret_ids(home: Path | None = None, *, near: Iterable[Path] = ()) -> Secrets:
    """Every file hpcbridge keeps or reads a secret in (credentials.secret_files): those of
    ``home`` (default: this process's HPCBRIDGE_HOME) and of any chain folder above a folder in
    ``near`` (a run's transfer jobs keep theirs there)."""
    from ..chain import CHAIN_DIR  # chain.py is heavy and needed only for its folder's name

    homes = {Path(home) if home is not None else default_home()}
    seen: set[Path] = set()
    for folder in near:
        for parent in [Path(os.path.abspath(folder)), *Path(os.path.abspath(folder)).parents]:
            if parent in seen:
                break
            seen.add(parent)
            if (parent / CHAIN_DIR).is_dir():
                homes.add(parent / CHAIN_DIR)
    ids: Secrets = {}
    for state in sorted(homes):
        for path in secret_files(state):
            try:
                st = os.stat(path)
            except OSError:
                continue
            ids.setdefault((st.st_dev, st.st_ino), path)
    return ids


def check_file(
    path: Path | str,
    *,
    dir_fd: int | None = None,
    shown_as: object = None,
    secrets: Secrets | None = None,
    scope: str = UPLOAD,
) -> tuple[int, tuple[int, int]]:
    """(size, identity) of a regular file that may be uploaded; a StageError for a link, a
    special file, or one of hpcbridge's secrets. The file is opened (so it is readable now,
    not only when its turn to upload comes) without following a link."""
    label = path if shown_as is None else shown_as
    try:
        mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        raise StageError(f"{shown(label)}: no such file or folder") from None
    except OSError as exc:
        raise StageError(f"{shown(label)}: cannot read it: {exc.strerror}") from None
    _refuse_entry(mode, label, path, dir_fd, scope)
    fd = open_regular(path, dir_fd=dir_fd, shown_as=label, scope=scope)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    ident = (st.st_dev, st.st_ino)
    if secrets and ident in secrets:
        holds = f"the same file as {shown(secrets[ident])}, which holds credentials"
        raise refusal(label, holds, scope)
    return st.st_size, ident


@contextmanager
def subfolder(fd: int, name: str, path: Path, scope: str = UPLOAD) -> Iterator[int]:
    """A descriptor of the folder ``name`` in the open folder ``fd``, not followed if it is a
    link (``path`` is how messages name it), closed again when the block ends."""
    try:
        sub = os.open(name, _FOLDER, dir_fd=fd)
    except OSError as exc:
        raise _not_a_folder(name, path, fd, exc, scope) from None
    try:
        yield sub
    finally:
        os.close(sub)


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
