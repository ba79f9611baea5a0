"""Files over the connection's SFTP session. Remote writes go to a random temporary name and
are renamed into place, local ones to ``.NAME.PID.part``; what a job wrote is copied back
without following a symbolic link."""

from __future__ import annotations

import contextlib
import errno
import stat
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import paramiko

from ..errors import TransportError
from ..stageout import kind_of, link_refusal, refusal, replaced
from ..transport import READ_LIMIT, part_path, remote_path
from .connection import Connection, T
from .hops import CHUNK, reason, sftp_reason


class SftpFiles:
    """The file half of SshTransport, over the SFTP session of its ``_connection``."""

    _connection: Connection
    _posix_rename = True
    #: how long one SFTP request may go unanswered before the transfer is abandoned
    sftp_timeout = 60.0

    def _do(
        self, action: str, target: str, fn: Callable[[paramiko.SFTPClient], T], what: str = ""
    ) -> T:
        """``fn`` on the SFTP session; an SFTP error as "cannot ACTION host:TARGET: why"."""
        try:
            return self._connection.sftp_call(what or f"{action} {target}", fn, self.sftp_timeout)
        except OSError as exc:
            raise TransportError(
                f"cannot {action} {self._connection.address}:{target}: {sftp_reason(exc)}"
            ) from None

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        target = remote_path(path)
        data = text.encode("utf-8")
        self._write(f"write {target}", target, mode, lambda fh: fh.write(data))

    def put(self, local: Path, path: str, *, mode: int | None = None) -> None:
        target = remote_path(path)
        try:
            source = open(local, "rb")  # closed below, opened before connecting
        except OSError as exc:
            raise TransportError(f"cannot read {local}: {reason(exc)}") from None

        def copy(fh: paramiko.SFTPFile) -> None:
            source.seek(0)  # a retried attempt starts over
            while chunk := source.read(CHUNK * 8):
                fh.write(chunk)

        with source:
            self._write(f"copy {local} to {target}", target, mode, copy)

    def _write(
        self, what: str, target: str, mode: int | None, write: Callable[[paramiko.SFTPFile], None]
    ) -> None:
        # random, not the pid: several machines may write into the same remote folder
        name = PurePosixPath(target).name
        tmp = str(PurePosixPath(target).with_name(f".{name}.{uuid.uuid4().hex[:12]}.part"))

        def fn(sftp: paramiko.SFTPClient) -> None:
            _mkdirs(sftp, str(PurePosixPath(target).parent))
            try:
                with sftp.open(tmp, "wb") as fh:
                    if mode is not None:
                        fh.chmod(mode)  # before the data, so it is never readable more widely
                    fh.set_pipelined(True)
                    write(fh)
                self._replace(sftp, tmp, target)
            except TimeoutError:
                raise
            except OSError:
                if not sftp.get_channel().closed:
                    with contextlib.suppress(OSError):
                        sftp.remove(tmp)
                raise

        self._do("write", target, fn, what)

    def _replace(self, sftp: paramiko.SFTPClient, tmp: str, target: str) -> None:
        if self._posix_rename:
            try:
                sftp.posix_rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno is not None or "unsupported" not in str(exc).lower():
                    raise
                self._posix_rename = False  # not OpenSSH: plain SFTP rename won't overwrite
        with contextlib.suppress(FileNotFoundError):
            sftp.remove(target)
        sftp.rename(tmp, target)

    def read_text(self, path: str, *, limit: int = READ_LIMIT) -> str | None:
        target = remote_path(path)

        def fn(sftp: paramiko.SFTPClient) -> str | None:
            with contextlib.suppress(FileNotFoundError), sftp.open(target, "rb") as fh:
                return fh.read(limit).decode("utf-8", "replace")
            return None

        return self._do("read", target, fn)

    def get(self, path: str, local: Path) -> None:
        source = remote_path(path)
        tmp = part_path(local)

        def fn(sftp: paramiko.SFTPClient) -> None:
            with sftp.open(source, "rb") as remote:
                remote.prefetch()
                _copy_into(remote, tmp, local)
            _into_place(tmp, local)

        try:
            self._do("copy", source, fn, f"copy {source} to {local}")
        finally:
            tmp.unlink(missing_ok=True)

    def get_files(
        self, folder: str, local: Path, *, below: str | None = None, scope: str = "given"
    ) -> list[str]:
        """Copy the regular files directly in ``folder`` into ``local``; their names, sorted.

        For what a job wrote: nothing is read through a symbolic link. ``folder`` must not be a
        link, nor (with ``below``, an ancestor) any folder between the two; in it, a link, FIFO,
        socket or device is refused (a RefusedFileError naming it, before anything is copied);
        sub-folders are left, as ``files_in`` leaves them. SFTP's listing reports lstat
        attributes, but its open follows links, so each file's attributes are compared with
        those of the opened handle and of a fresh lstat after the copy: a file swapped for a
        link meanwhile is refused too. A missing ``folder`` holds no files.
        """
        target = remote_path(folder)

        def fn(sftp: paramiko.SFTPClient) -> list[str]:
            try:
                _no_link_between(sftp, below, target, scope)
                entries = sftp.listdir_attr(target)
            except FileNotFoundError:
                return []
            for entry in entries:
                _check(sftp, f"{target}/{entry.filename}", entry, scope)
            files = sorted(
                (e for e in entries if stat.S_ISREG(e.st_mode or 0)), key=lambda e: e.filename
            )
            for entry in files:
                _fetch(sftp, f"{target}/{entry.filename}", entry, local / entry.filename)
            return [e.filename for e in files]

        return self._do("copy the files of", target, fn, f"copy the files of {target} to {local}")

    def files_in(self, folder: str) -> list[str]:
        target = remote_path(folder)

        def fn(sftp: paramiko.SFTPClient) -> list[str]:
            with contextlib.suppress(FileNotFoundError):
                entries = sftp.listdir_attr(target)
                return sorted(e.filename for e in entries if stat.S_ISREG(e.st_mode or 0))
            return []

        return self._do("list", target, fn)

    def remove(self, path: str) -> None:
        target = remote_path(path)

        def fn(sftp: paramiko.SFTPClient) -> None:
            with contextlib.suppress(FileNotFoundError):
                sftp.remove(target)

        self._do("delete", target, fn)

    def makedirs(self, path: str) -> None:
        target = remote_path(path)
        self._do("create", target, lambda sftp: _mkdirs(sftp, target))


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """``mkdir -p``: one stat when the folder is there, which is the usual case."""
    try:
        if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            return
        raise OSError(errno.EEXIST, f"{path} exists and is not a folder")
    except FileNotFoundError:
        pass
    parent = str(PurePosixPath(path).parent)
    if parent != path:
        _mkdirs(sftp, parent)
    try:
        sftp.mkdir(path)
    except OSError:
        # another writer may have made it meanwhile; SFTP says only "Failure"
        if not stat.S_ISDIR(sftp.stat(path).st_mode or 0):
            raise


def _copy_into(remote: paramiko.SFTPFile, tmp: Path, dest: Path) -> None:
    try:
        fh = open(tmp, "wb")  # closed by the with below
    except OSError as exc:
        raise _cannot_write(dest, exc) from None
    with fh:
        while chunk := remote.read(CHUNK * 8):
            try:
                fh.write(chunk)
            except OSError as exc:
                raise _cannot_write(dest, exc) from None


def _into_place(tmp: Path, dest: Path) -> None:
    try:
        tmp.replace(dest)
    except OSError as exc:
        raise _cannot_write(dest, exc) from None


def _cannot_write(dest: Path, exc: OSError) -> TransportError:
    return TransportError(f"cannot write {dest}: {reason(exc)}")


def _fetch(
    sftp: paramiko.SFTPClient, source: str, entry: paramiko.SFTPAttributes, dest: Path
) -> None:
    """Copy one listed file, refused if it is no longer the file listed (a link now)."""
    tmp = part_path(dest)
    try:
        with sftp.open(source, "rb") as remote:
            if not _same(entry, remote.stat()):
                raise replaced(source)
            remote.prefetch()
            _copy_into(remote, tmp, dest)
        if not _same(entry, sftp.lstat(source)):
            raise replaced(source)
        _into_place(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _same(a: paramiko.SFTPAttributes, b: paramiko.SFTPAttributes) -> bool:
    same = (a.st_size, a.st_mtime, a.st_uid) == (b.st_size, b.st_mtime, b.st_uid)
    return stat.S_ISREG(b.st_mode or 0) and same


def _check(
    sftp: paramiko.SFTPClient, path: str, attrs: paramiko.SFTPAttributes, scope: str
) -> None:
    """Refuse a link, FIFO, socket or device (a RefusedFileError naming it)."""
    mode = attrs.st_mode or 0
    if stat.S_ISLNK(mode):
        try:
            to: str | None = sftp.readlink(path)
        except OSError:
            to = None
        raise link_refusal(path, to, scope)
    what = kind_of(mode)
    if what is not None:
        raise refusal(path, what, scope)


def _no_link_between(sftp: paramiko.SFTPClient, below: str | None, folder: str, scope: str) -> None:
    """Refuse ``folder`` if it, or a folder between ``below`` and it, is a link: one round
    trip for each when none is (realpath below + the rest == realpath of folder), one lstat
    per part to name the link when there is one."""
    start = remote_path(below) if below else None
    if start is None or not folder.startswith(f"{start.rstrip('/')}/"):
        _check(sftp, folder, sftp.lstat(folder), scope)
        return
    rest = PurePosixPath(folder).relative_to(start)
    with contextlib.suppress(FileNotFoundError):  # a dangling link: found below
        if sftp.normalize(folder) == str(PurePosixPath(sftp.normalize(start)) / rest):
            return
    here = PurePosixPath(start)
    for part in rest.parts:
        here = here / part
        _check(sftp, str(here), sftp.lstat(str(here)), scope)
