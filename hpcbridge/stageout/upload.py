"""The XNAT side of an upload: the target, the plan against its listing, the requests, the
verification by re-listing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StageError, XnatConflictError, XnatNotFoundError
from ..xnat.address import Address
from ..xnat.browse import experiment, require
from ..xnat.client import XnatClient
from ..xnat.model import FileEntry
from .files import CHUNK, LocalFile

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
OVERWRITE_HINT = "add --overwrite to replace them"


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
    return {e.path: e for e in map(FileEntry.from_row, rows)}


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
        raise StageError(
            f"{_first(target, clashes)} already exist(s) in XNAT with "
            "different content; nothing was uploaded",
            hint=OVERWRITE_HINT,
        )
    if unproven:
        # Older archives may list no digest: same size proves nothing, so do not guess.
        raise StageError(
            f"{_first(target, unproven)} already exist(s) in XNAT without a digest, "
            "so hpcbridge cannot tell whether they are identical; nothing was uploaded",
            hint=OVERWRITE_HINT,
        )
    return todo, skipped


def _first(target: Target, names: list[str]) -> str:
    """'LABEL: NAME and N more', for an error about several files."""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{target.label}: {names[0]}{more}"


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
    with item.open() as fh:
        body = _Counting(fh, progress)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(item.size)}
        resp = client.request(
            "PUT",
            f"{target.files_url}/{item.remote}",
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
        size = bundle.stat().st_size
        with open(bundle, "rb") as fh:
            resp = client.request(
                "PUT",
                f"{target.files_url}/upload.zip",
                f"uploading {len(todo)} files to {target.label}",
                params=_upload_params(labels, overwrite, extract=True),
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
