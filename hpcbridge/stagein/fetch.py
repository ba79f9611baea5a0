"""One scan's stage-in: its plan (XNAT's listing, the folders), the download, the manifest.

A download is streamed to ``*.part`` in a folder of this process's own in the staging tree,
checked and unpacked there, summarised with pydicom, given its ``manifest.json``, and only then
renamed into place: a failure at any point leaves no folder that looks complete.

The staging tree is shared by every stage-in into the same destination. A chain's stage-in
jobs run at once, on several nodes, into one work root: each download gets a folder of its own
under the scan's, named so that no other process (here or on another host) can pick the same,
and each process removes only its own folder. Parents are removed only when empty, and a
sibling may create or remove them at any moment.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from ..errors import StageError, XnatConnectionError
from ..units import utc_stamp
from ..xnat.client import XnatClient
from ..xnat.model import FileEntry, Scan
from .layout import (
    CHUNK,
    MANIFEST,
    STAGING,
    Limits,
    Progress,
    StagedScan,
    resource_folder,
    safe_name,
    scan_folder,
    xnat_scan_folder,
)
from .unzip import _extract, _file_matches, _read_manifest

log = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 3


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


@dataclass
class _Plan:
    experiment_id: str
    experiment_label: str
    scan: Scan
    resource: str
    folder: Path
    staging: Path
    listing: list[FileEntry]
    address: str
    #: The manifest up_to_date verified: read once, as a stage-in of the same scan elsewhere
    #: may be swapping the folder meanwhile.
    manifest: dict[str, Any] | None = None

    @property
    def total(self) -> int:
        return sum(f.size for f in self.listing)

    @property
    def url(self) -> str:
        return (
            f"/data/experiments/{self.experiment_id}/scans/{self.scan.id}/resources/"
            f"{self.resource}/files"
        )

    def up_to_date(self) -> bool:
        """The manifest is there, agrees with XNAT's listing, and the files still verify."""
        manifest = self.manifest = _read_manifest(self.folder / MANIFEST)
        if manifest is None:
            return False
        recorded = {f["path"]: f for f in manifest.get("files", [])}
        if {f.path: (f.size, f.digest) for f in self.listing} != {
            p: (r["size"], r.get("xnat_digest", "")) for p, r in recorded.items()
        }:
            return False
        return all(_file_matches(self.folder / "files" / p, r) for p, r in recorded.items())

    def skipped(self) -> StagedScan:
        manifest = self.manifest or {}
        return StagedScan(
            self.scan, self.folder, True, len(self.listing), self.total, manifest.get("dicom", {})
        )

    def fetch(
        self, client: XnatClient, allow_non_dicom: bool, limits: Limits, progress: Progress | None
    ) -> StagedScan:
        _remove_abandoned(self.staging)
        own: Path | None = None
        try:
            own = _make_own_folder(self.staging)
            zip_path = own / "download.zip.part"
            self._download(client, zip_path, progress)
            files_dir = own / self.resource_dirname / "files"
            entries = _extract(
                zip_path, files_dir, self._prefix(), self.listing, limits, self.address
            )
            zip_path.unlink()
            dicom = summarise_dicom(files_dir, entries)
            if not dicom["instances"] and not allow_non_dicom:
                raise StageError(
                    f"{self.address}: resource {self.resource} holds no DICOM "
                    f"({len(entries)} other file(s))",
                    hint="use --allow-non-dicom to stage it anyway",
                )
            self._write_manifest(files_dir.parent, entries, dicom)
            _place(files_dir.parent, self.folder)
        except OSError as exc:
            # A full disk can also strike creating a folder or renaming into place: a clear
            # error for this scan, not a traceback that ends the other scans' downloads too.
            where = exc.filename or self.folder
            raise StageError(
                f"{self.address}: cannot write {where}: {exc.strerror or exc}"
            ) from None
        finally:
            if own is not None:
                _remove_own_folder(own, self.staging.parents[1])
        return StagedScan(self.scan, self.folder, False, len(entries), self.total, dicom)

    @property
    def resource_dirname(self) -> str:
        return safe_name(self.resource)

    def _prefix(self) -> str:
        """The path every zip entry must start with (XNAT's default zip layout)."""
        folder = xnat_scan_folder(self.scan)
        return f"{self.experiment_label}/scans/{folder}/resources/{self.resource}/files/"

    def _download(self, client: XnatClient, target: Path, progress: Progress | None) -> None:
        """Stream the zip to disk; a cut connection restarts it (XNAT has no Range support)."""
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            got = 0
            try:
                with (
                    client.stream(
                        "GET", self.url, f"files of {self.address}", params={"format": "zip"}
                    ) as resp,
                    open(target, "wb") as out,
                ):
                    for chunk in resp.iter_content(CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                        if progress:
                            progress(len(chunk))
                return
            except (requests.RequestException, XnatConnectionError) as exc:
                if progress and got:
                    progress(-got)
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise StageError(
                        f"{self.address}: download failed {attempt} times: {_brief(exc)}",
                        hint="check the network and re-run",
                    ) from None
                log.warning(
                    "%s: download cut after %d bytes (%s); restarting",
                    self.address,
                    got,
                    _brief(exc),
                )
                time.sleep(0.5 * attempt)
            except OSError as exc:
                raise StageError(f"{self.address}: cannot write {target}: {exc.strerror}") from None

    def _write_manifest(
        self, folder: Path, entries: list[dict[str, Any]], dicom: dict[str, Any]
    ) -> None:
        manifest = {
            "hpcbridge_manifest": 1,
            "address": self.address,
            "experiment": {"ID": self.experiment_id, "label": self.experiment_label},
            "scan": {
                "ID": self.scan.id,
                "type": self.scan.type,
                "series_description": self.scan.series_description,
                "quality": self.scan.quality,
            },
            "resource": self.resource,
            "staged_at": utc_stamp(),
            "files": entries,
            "dicom": dicom,
        }
        path = folder / MANIFEST
        try:
            path.write_text(json.dumps(manifest, indent=1))
        except OSError as exc:  # ENOSPC here carries no file name: say which file it was
            raise StageError(f"{self.address}: cannot write {path}: {exc.strerror}") from None


def _brief(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return text.split(":")[-1].strip()[:120] or type(exc).__name__


def _plan(
    client: XnatClient,
    experiment_id: str,
    experiment_label: str,
    scan: Scan,
    resource: str,
    dest: Path,
    base: str,
) -> _Plan:
    address = f"{base}/{scan.id}"
    rows = client.listing(
        f"/data/experiments/{experiment_id}/scans/{scan.id}/resources/{resource}/files",
        f"resource {resource} of {address}",
    )
    listing = [FileEntry.from_row(r) for r in rows]
    folder = resource_folder(dest, experiment_label, scan, resource)
    staging = dest / STAGING / safe_name(experiment_label) / scan_folder(scan)
    return _Plan(experiment_id, experiment_label, scan, resource, folder, staging, listing, address)


def summarise_dicom(files_dir: Path, entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Series UIDs, modality, instance count, description, manufacturer; non-DICOM files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for entry in entries:
        try:
            ds = pydicom.dcmread(files_dir / entry["path"], stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            other.append(entry["path"])
            continue
        info = series.setdefault(
            uid,
            {
                "series_instance_uid": uid,
                "modality": str(ds.get("Modality", "")),
                "series_description": str(ds.get("SeriesDescription", "")),
                "series_number": str(ds.get("SeriesNumber", "")),
                "manufacturer": str(ds.get("Manufacturer", "")),
                "instances": 0,
            },
        )
        info["instances"] += 1
    return {
        "series": list(series.values()),
        "instances": sum(s["instances"] for s in series.values()),
        "mixed_series": len(series) > 1,
        "non_dicom": other,
    }
