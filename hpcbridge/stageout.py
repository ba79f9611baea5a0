"""Stage-out: put result files into a named resource of a scan (or an assessor), verified.

The whole upload is planned before the first byte is sent: XNAT's listing of the target
resource is read, every local file XNAT already has is hashed, and an existing file with
different content is an error (unless ``overwrite``) before anything changes. Identical files
are skipped. New files are hashed while they are sent, so each is read once. Uploads stream file
objects with ``inbody=true`` (never a multipart body built in memory); many small files go up
as one zip with ``extract=true``. XNAT answers 200 both when it keeps an old file (a
``duplicates`` list) and, for a user without write rights, when it stores nothing, so only the
re-listing afterwards proves an upload: every file is checked by name, size and digest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .config import default_home
from .credentials import secret_files
from .errors import StageError, XnatConflictError, XnatNotFoundError
from .xnat.address import Address
from .xnat.browse import experiment, require
from .xnat.client import XnatClient
from .xnat.model import FileEntry

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Names XNAT stores and addresses verbatim (it decodes only some escapes in file paths).
SAFE_PATH = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
# Batch into one zip when there are this many files, all smaller than SMALL_FILE.
ZIP_MIN_FILES = 8
SMALL_FILE = 4 * 1024 * 1024

# Catalog format/content for dcm2niix outputs, so XNAT's UI says what each file is.
OUTPUT_KINDS: list[tuple[tuple[str, ...], str, str]] = [
    ((".nii.gz", ".nii"), "NIFTI", "IMAGE"),
    ((".json",), "JSON", "BIDS_SIDECAR"),
    ((".bval",), "BVAL", "DIFFUSION_GRADIENTS"),
    ((".bvec",), "BVEC", "DIFFUSION_GRADIENTS"),
]


def default_labels(name: str) -> tuple[str, str]:
    """(format, content) for a file name; ('', '') when it is not a known output."""
    lowered = name.lower()
    for suffixes, fmt, content in OUTPUT_KINDS:
        if lowered.endswith(suffixes):
            return fmt, content
    return "", ""


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


@dataclass(frozen=True)
class Target:
    """Where files go: a scan resource, or an assessor's in/out resource."""

    base: str  # URL path of the owner, e.g. /data/experiments/XNAT_E00001/scans/4
    resource: str
    label: str  # for messages: PROJECT/SUBJECT/EXPERIMENT/SCAN resource R

    @property
    def files_url(self) -> str:
        return f"{self.base}/resources/{self.resource}/files"


@dataclass
class StageOutReport:
    target: str
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    created_resource: bool = False
    bytes: int = 0


Progress = Callable[[int], None]


# -- what may be read: regular files only, never through a link ----------------------------------
#
# A job's output folder is written by whatever the job ran, and some tools link their inputs
# into it. Reading through such a link would upload whatever it points to: another user-owned
# file, or hpcbridge's own credentials. So nothing is opened through a link: entries are judged
# by lstat, files opened with O_NOFOLLOW, and the opened descriptor (not the name) is checked to
# be the regular file judged. O_NONBLOCK keeps a FIFO from blocking the open forever; a regular
# file ignores it.

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


def _readlink(name: str | Path, dir_fd: int | None = None) -> str | None:
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
        raise link_refusal(path, _readlink(name, dir_fd), scope)
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
            raise link_refusal(label, _readlink(path, dir_fd), scope) from None
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


def open_subfolder(fd: int, name: str, path: Path, scope: str = UPLOAD) -> int:
    """A descriptor of the folder ``name`` in the open folder ``fd``, not followed if it is a
    link (``path`` is how messages name it)."""
    try:
        return os.open(name, _FOLDER, dir_fd=fd)
    except OSError as exc:
        raise _not_a_folder(name, path, fd, exc, scope) from None


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
        return link_refusal(path, _readlink(name, dir_fd), scope)
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
    from .chain import CHAIN_DIR  # chain.py is heavy and needed only for its folder's name

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
            sub = open_subfolder(fd, name, path, scope)
            try:
                _walk(sub, path, f"{prefix}{name}/", found, secrets, scope)
            finally:
                os.close(sub)
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


def resolve_target(
    client: XnatClient,
    address: Address,
    resource: str,
    *,
    assessor: str | None = None,
    inout: str = "out",
) -> Target:
    """The URL path of the scan (or assessor) that will hold ``resource``."""
    if not re.match(r"^[A-Za-z0-9_-]+$", resource) or resource.isdigit():
        raise StageError(
            f"resource label {resource!r} must be letters, digits, '_' or '-' (and not only digits)"
        )
    if assessor is None and address.depth != 4:
        raise StageError(
            "stage-out needs a scan: PROJECT/SUBJECT/EXPERIMENT/SCAN "
            "(or an experiment with --assessor)"
        )
    if assessor is not None and address.depth < 3:
        raise StageError("--assessor needs an experiment: PROJECT/SUBJECT/EXPERIMENT")
    expt = experiment(
        client, address.experiment or "", project=address.project, subject=address.subject
    )
    if assessor is not None:
        base = f"/data/experiments/{expt.id}/assessors/{assessor}/{inout}"
        label = f"{Address(address.project, address.subject, address.experiment)} assessor "
        label += f"{assessor} ({inout})"
        try:
            client.request(
                "GET",
                f"/data/experiments/{expt.id}/assessors/{assessor}",
                f"assessor {assessor}",
                params={"format": "json"},
            )
        except XnatNotFoundError:
            raise XnatNotFoundError(
                f"not found: assessor {assessor} of {label.split()[0]}", status=404
            ) from None
    else:
        base = f"/data/experiments/{expt.id}/scans/{address.scan}"
        label = str(address)
        try:
            client.request("GET", base, str(address), params={"format": "json"})
        except XnatNotFoundError:
            require(client, address)
            raise
    return Target(base, resource, f"{label} resource {resource}")


def remote_files(client: XnatClient, target: Target) -> dict[str, FileEntry] | None:
    """The resource's files by path, or None when the resource does not exist."""
    try:
        rows = client.listing(target.files_url, f"files of {target.label}")
    except XnatNotFoundError:
        return None
    entries = [FileEntry.from_row(r) for r in rows]
    return {e.path: e for e in entries}


def stage_out(
    client: XnatClient,
    target: Target,
    files: list[LocalFile],
    *,
    overwrite: bool = False,
    fmt: str | None = None,
    content: str | None = None,
    batch_small: bool = True,
    progress: Progress | None = None,
) -> StageOutReport:
    """Upload ``files`` into the target resource; verify every one against the listing."""
    report = StageOutReport(target.label)
    existing = remote_files(client, target)
    todo, report.skipped = _plan(files, existing or {}, overwrite, target)
    if existing is None:
        _create_resource(client, target, files, fmt, content)
        report.created_resource = True
    for labels, group in _groups(todo).items():
        if batch_small and len(group) >= ZIP_MIN_FILES and all(f.size < SMALL_FILE for f in group):
            _upload_zip(client, target, group, labels, overwrite, progress)
        else:
            for item in group:
                _upload_one(client, target, item, overwrite, progress)
    _verify(client, target, todo)
    report.uploaded = [f.remote for f in todo]
    report.bytes = sum(f.size for f in todo)
    return report


def _groups(files: list[LocalFile]) -> dict[tuple[str, str], list[LocalFile]]:
    """Files by their (format, content) labels: a zip carries one set of labels for all."""
    groups: dict[tuple[str, str], list[LocalFile]] = {}
    for item in files:
        groups.setdefault(default_labels(item.remote), []).append(item)
    return groups


def _plan(
    files: list[LocalFile], existing: dict[str, FileEntry], overwrite: bool, target: Target
) -> tuple[list[LocalFile], list[str]]:
    todo, skipped, clashes, unproven = [], [], [], []
    for item in files:
        there = existing.get(item.remote)
        if there is None:
            todo.append(item)
        elif there.size == item.size and there.digest == item.digest():
            skipped.append(item.remote)
        elif overwrite:
            todo.append(item)
        elif there.size == item.size and not there.digest:
            unproven.append(item.remote)
        else:
            clashes.append(item.remote)
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise StageError(
            f"{target.label}: {clashes[0]}{more} already exist(s) in XNAT with "
            "different content; nothing was uploaded",
            hint="add --overwrite to replace them",
        )
    if unproven:
        # Older archives may list no digest: same size proves nothing, so do not guess.
        more = f" and {len(unproven) - 1} more" if len(unproven) > 1 else ""
        raise StageError(
            f"{target.label}: {unproven[0]}{more} already exist(s) in XNAT without a digest, "
            "so hpcbridge cannot tell whether they are identical; nothing was uploaded",
            hint="add --overwrite to replace them",
        )
    return todo, skipped


def _create_resource(
    client: XnatClient, target: Target, files: list[LocalFile], fmt: str | None, content: str | None
) -> None:
    kinds = {default_labels(f.remote) for f in files}
    params = {}
    if fmt or any(k == ("NIFTI", "IMAGE") for k in kinds):
        params["format"] = fmt or "NIFTI"
    if content or params.get("format") == "NIFTI":
        params["content"] = content or "NIFTI_RAW"
    url = f"{target.base}/resources/{target.resource}"
    try:
        client.request("PUT", url, f"creating {target.label}", params=params)
    except XnatConflictError:
        pass  # created meanwhile by another run: fine


def _upload_params(
    labels: tuple[str, str], overwrite: bool, *, extract: bool = False
) -> dict[str, str]:
    params = {"inbody": "true"}
    if extract:
        params["extract"] = "true"
    if overwrite:
        params["overwrite"] = "true"
    if labels[0]:
        params.update(format=labels[0], content=labels[1])
    return params


def _check_duplicates(body: str, target: Target) -> None:
    if "duplicates" not in body:
        return
    try:
        kept = json.loads(body).get("duplicates", [])
    except (ValueError, AttributeError):
        kept = []
    if kept:
        raise StageError(
            f"{target.label}: XNAT kept its existing {kept[0]} instead of the new one",
            hint="add --overwrite to replace it",
        )


class _Counting:
    """A file object that reports bytes as requests reads them (streamed, not loaded).

    It hands out ``CHUNK`` bytes per read even when asked for fewer: urllib3 reads request
    bodies 16 KiB at a time, and 65,536 small reads and sends per GiB cost the upload about a
    tenth of its speed on loopback (docs/performance.md). Its readers (urllib3, http.client)
    read until ``b""`` and never rely on the size they asked for.
    """

    def __init__(self, fh: Any, progress: Progress | None) -> None:
        self._fh = fh
        self._progress = progress
        self._md5 = hashlib.md5()
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n if n < 0 else max(n, CHUNK))
        self._md5.update(data)
        self.sent += len(data)
        if self._progress and data:
            self._progress(len(data))
        return data

    def hexdigest(self) -> str:
        """The md5 of what was sent (since the last rewind)."""
        return self._md5.hexdigest()

    def seek(self, *args: Any) -> int:
        pos = int(self._fh.seek(*args))
        if pos == 0:  # a resend after re-login starts the digest again
            self._md5, self.sent = hashlib.md5(), 0
        return pos

    def tell(self) -> int:
        return int(self._fh.tell())

    def __len__(self) -> int:
        return os.fstat(self._fh.fileno()).st_size


def _upload_one(
    client: XnatClient, target: Target, item: LocalFile, overwrite: bool, progress: Progress | None
) -> None:
    url = f"{target.files_url}/{item.remote}"
    with item.open() as fh:
        body = _Counting(fh, progress)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(item.size)}
        resp = client.request(
            "PUT",
            url,
            f"uploading {item.remote} to {target.label}",
            params=_upload_params(default_labels(item.remote), overwrite),
            data=body,
            headers=headers,
        )
    _check_duplicates(resp.text, target)
    # What was sent is what XNAT must list; hashed on the way, so the file is read once.
    if body.sent == item.size:
        item.md5 = body.hexdigest()


def _upload_zip(
    client: XnatClient,
    target: Target,
    todo: list[LocalFile],
    labels: tuple[str, str],
    overwrite: bool,
    progress: Progress | None,
) -> None:
    """Many small files: one request with a stored zip that XNAT unpacks into the resource."""
    with tempfile.TemporaryDirectory(prefix="hpcbridge-upload-") as tmp:
        bundle = Path(tmp) / "upload.zip"
        with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as zf:
            for item in todo:
                _zip_one(zf, item)
        params = _upload_params(labels, overwrite, extract=True)
        size = bundle.stat().st_size
        with open(bundle, "rb") as fh:
            resp = client.request(
                "PUT",
                f"{target.files_url}/upload.zip",
                f"uploading {len(todo)} files to {target.label}",
                params=params,
                data=_Counting(fh, progress),
                headers={"Content-Type": "application/zip", "Content-Length": str(size)},
            )
    _check_duplicates(resp.text, target)


def _zip_one(zf: zipfile.ZipFile, item: LocalFile) -> None:
    """``zf.write`` for a checked file: it would open the name again, through any link."""
    with item.open() as fh:
        st = os.fstat(fh.fileno())
        # zip holds no time before 1980 (zf.write would refuse such a file outright)
        when = max(time.localtime(st.st_mtime)[:6], (1980, 1, 1, 0, 0, 0))
        info = zipfile.ZipInfo(item.remote, date_time=when)
        info.external_attr = (st.st_mode & 0xFFFF) << 16
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = st.st_size
        with zf.open(info, "w") as dest:
            shutil.copyfileobj(fh, dest, CHUNK)


def _verify(client: XnatClient, target: Target, uploaded: list[LocalFile]) -> None:
    """Only XNAT's listing proves an upload: name, size and (where listed) digest."""
    listed = remote_files(client, target) or {}
    for item in uploaded:
        there = listed.get(item.remote)
        if there is None:
            raise StageError(
                f"{target.label}: {item.remote} did not arrive (XNAT answered "
                "but does not list it; check your write access to the project)"
            )
        if there.size != item.size:
            raise StageError(
                f"{target.label}: {item.remote} is {there.size} bytes in XNAT, {item.size} here"
            )
        if there.digest and there.digest != item.digest():
            raise StageError(
                f"{target.label}: {item.remote} has md5 {there.digest} in XNAT, "
                f"{item.digest()} here"
            )
