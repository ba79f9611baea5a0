"""Stage-in: get scans' files from XNAT onto the local (cluster) filesystem, intact.

For each selected scan: list the resource's files (names, sizes, md5 digests), stream the
resource zip to ``*.part`` in a staging folder beside the destination, check the zip (entries,
CRCs, sizes, digests) while extracting it safely, summarise the DICOM with pydicom, write
``manifest.json``, and only then rename the finished folder into place. A failure at any point
leaves no folder that looks complete; a re-run skips scans whose manifest still verifies against
both the files on disk and XNAT's listing.

Layout under ``dest`` (XNAT's own zip layout, as the Artemis guide uses)::

    <experiment>/scans/<scan>-<type>/resources/<resource>/files/...
    <experiment>/scans/<scan>-<type>/resources/<resource>/manifest.json
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import requests

from .errors import HpcBridgeError, StageError, XnatConnectionError, XnatNotFoundError
from .units import human_size, utc_stamp
from .xnat.address import Address
from .xnat.browse import require, scans_of
from .xnat.client import XnatClient
from .xnat.model import FileEntry, Scan

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
MANIFEST = "manifest.json"
STAGING = ".hpcbridge-staging"
DOWNLOAD_ATTEMPTS = 3
# Entries at least this large are hashed in a helper thread while they are unpacked; for
# smaller ones starting the thread costs more than the overlap saves.
HASH_THREAD_BYTES = 8 * CHUNK


@dataclass(frozen=True)
class Limits:
    """Guards against zip bombs and bad archives (configurable per call)."""

    max_total_bytes: int = 64 * 1024**3  # everything one scan may unpack to
    max_ratio: float = 200.0  # uncompressed / compressed, per entry
    min_free_bytes: int = 64 * 1024**2  # left free on the destination after the download


@dataclass(frozen=True)
class Selection:
    """Which scans of an experiment: IDs, type globs, series-description globs (any matches)."""

    ids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    series: tuple[str, ...] = ()

    def matches(self, scan: Scan) -> bool:
        if not (self.ids or self.types or self.series):
            return True
        return (
            scan.id in self.ids
            or any(fnmatch.fnmatchcase(scan.type, g) for g in self.types)
            or any(fnmatch.fnmatchcase(scan.series_description, g) for g in self.series)
        )


@dataclass(frozen=True)
class StagedScan:
    """The outcome for one scan: where it is, and whether it was downloaded now."""

    scan: Scan
    folder: Path  # .../resources/<resource>
    skipped: bool
    files: int
    bytes: int
    dicom: dict[str, Any] = field(default_factory=dict)

    @property
    def files_dir(self) -> Path:
        return self.folder / "files"


@dataclass
class StageInReport:
    staged: list[StagedScan] = field(default_factory=list)
    failed: list[tuple[Scan, HpcBridgeError]] = field(default_factory=list)


Progress = Callable[[int], None]


def safe_name(text: str) -> str:
    """A label as a local path component: ``[A-Za-z0-9._-]`` only, never '.' or '..'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"
    return "_" + name if name in (".", "..") else name


def xnat_scan_folder(scan: Scan) -> str:
    """``<scan>-<type>`` exactly as XNAT names it in zips (type's ``\\W`` to ``_``)."""
    kind = re.sub(r"\W", "_", scan.type, flags=re.ASCII)
    return f"{scan.id}-{kind}" if scan.type else scan.id


def scan_folder(scan: Scan) -> str:
    """XNAT's scan folder name, made safe as a local path component."""
    return safe_name(xnat_scan_folder(scan))


def resource_folder(dest: Path, experiment_label: str, scan: Scan, resource: str) -> Path:
    return (
        Path(dest)
        / safe_name(experiment_label)
        / "scans"
        / scan_folder(scan)
        / "resources"
        / safe_name(resource)
    )


# -- entry point ------------------------------------------------------------------------------
def stage_in(
    client: XnatClient,
    address: Address,
    dest: Path,
    *,
    selection: Selection = Selection(),
    resource: str = "DICOM",
    allow_non_dicom: bool = False,
    workers: int = 2,
    limits: Limits = Limits(),
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> StageInReport:
    """Stage in the selected scans of the experiment at ``address``."""
    if address.depth < 3:
        raise StageError("stage-in needs an experiment: PROJECT/SUBJECT/EXPERIMENT[/SCAN]")
    if address.scan:
        selection = Selection(
            ids=(*selection.ids, address.scan), types=selection.types, series=selection.series
        )
    experiment_id, experiment_label, candidates = scans_of(client, address)
    chosen = [s for s in candidates if selection.matches(s)]
    if not chosen:
        if address.scan:
            require(client, address)
        raise StageError(
            f"no scan of {address} matches the selection "
            f"(scans there: {', '.join(s.id for s in candidates) or 'none'})"
        )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client.ensure_session()  # one login before the threads share the session
    base = str(Address(address.project, address.subject, address.experiment))
    report = StageInReport()
    plans = []
    for scan in chosen:
        try:
            plans.append(_plan(client, experiment_id, experiment_label, scan, resource, dest, base))
        except XnatNotFoundError:
            report.failed.append((scan, StageError(f"{base}/{scan.id} has no resource {resource}")))
    # Verify each staged copy once: hashing is the expensive part of a re-run, and a second
    # look could disagree with the first (a file changing meanwhile) and drop a scan from both.
    fresh = [p.up_to_date() for p in plans]
    todo = [p for p, ok in zip(plans, fresh, strict=True) if not ok]
    _check_space(dest, sum(p.total for p in todo), limits)
    if on_total is not None:
        on_total(sum(p.total for p in todo))
    report.staged += [p.skipped() for p, ok in zip(plans, fresh, strict=True) if ok]
    lock = threading.Lock()

    def run(plan: _Plan) -> None:
        try:
            staged = plan.fetch(client, allow_non_dicom, limits, progress)
        except HpcBridgeError as exc:
            with lock:
                report.failed.append((plan.scan, exc))
            return
        with lock:
            report.staged.append(staged)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        list(pool.map(run, todo))
    report.staged.sort(key=lambda s: s.scan.id)
    return report


# -- the staging tree, shared by every stage-in into the same destination ----------------------
# A chain's stage-in jobs run at once, on several nodes, into one work root: each download
# gets a folder of its own under the scan's, named so that no other process (here or on
# another host) can pick the same, and each process removes only its own folder. Parents are
# removed only when empty, and a sibling may create or remove them at any moment.
_HOST = safe_name(socket.gethostname()).replace("-", "_")
MKDIR_ATTEMPTS = 5
ABANDONED_SECONDS = 2 * 24 * 3600.0


def _own_name() -> str:
    """``<host>-<pid>-<random>``: unique among processes sharing a file system."""
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _make_own_folder(parent: Path) -> Path:
    """A new folder of this process's under ``parent``."""
    for _ in range(MKDIR_ATTEMPTS):
        folder = parent / _own_name()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
            return folder
        except FileNotFoundError:
            continue  # a sibling's clean-up removed an empty parent in between: make it again
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / _own_name()
    folder.mkdir()
    return folder


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


def _check_space(dest: Path, needed: int, limits: Limits) -> None:
    # The zip and the extracted files coexist until the zip is removed.
    want = 2 * needed + limits.min_free_bytes
    free = shutil.disk_usage(dest).free
    if needed and free < want:
        raise StageError(
            f"not enough free space in {dest}: need {human_size(want)}, have {human_size(free)}",
            hint="free space or choose another --dest",
        )


# -- one scan --------------------------------------------------------------------------------
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
    folder = resource_folder(dest, experiment_label, scan, resource)
    staging = dest / STAGING / safe_name(experiment_label) / scan_folder(scan)
    return _Plan(
        experiment_id,
        experiment_label,
        scan,
        resource,
        folder,
        staging,
        [FileEntry.from_row(r) for r in rows],
        address,
    )


# -- verification and extraction ------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("hpcbridge_manifest") == 1 else None


def md5_of(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks (stage-out uses it too)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_matches(path: Path, record: dict[str, Any]) -> bool:
    try:
        if path.stat().st_size != record["size"]:
            return False
    except OSError:
        return False
    return md5_of(path) == record["md5"]


def _extract(
    zip_path: Path,
    files_dir: Path,
    prefix: str,
    listing: Sequence[FileEntry],
    limits: Limits,
    address: str,
) -> list[dict[str, Any]]:
    """Check and unpack the zip; return the manifest's file records."""
    expected = {f.path: f for f in listing}
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise StageError(
            f"{address}: the download is not a valid zip (truncated or corrupt)",
            hint="re-run to download it again",
        ) from None
    records = []
    total = 0
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        for info in infos:
            rel = _member_path(info, prefix, address)
            want = expected.get(rel)
            if want is None:
                raise StageError(f"{address}: the zip holds {rel!r}, which XNAT does not list")
            if info.file_size != want.size:
                raise StageError(
                    f"{address}: {rel} is {info.file_size} bytes in the zip but "
                    f"{want.size} in XNAT's listing"
                )
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
                raise StageError(
                    f"{address}: {rel} expands {info.file_size // info.compress_size}"
                    f" times; refusing a possible zip bomb"
                )
            total += info.file_size
            if total > limits.max_total_bytes:
                raise StageError(
                    f"{address}: the zip unpacks to more than "
                    f"{human_size(limits.max_total_bytes)}; refusing it"
                )
            target = files_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = _copy_out(archive, info, target, want.size, address, rel)
            if want.digest and digest != want.digest:
                raise StageError(f"{address}: {rel} has md5 {digest}, XNAT lists {want.digest}")
            records.append(
                {
                    "path": rel,
                    "size": want.size,
                    "md5": digest,
                    "xnat_digest": want.digest,
                    "uri": want.uri,
                }
            )
    missing = sorted(set(expected) - {r["path"] for r in records})
    if missing:
        raise StageError(
            f"{address}: the zip lacks {len(missing)} file(s) XNAT lists, e.g. {missing[0]}",
            hint="re-run to download it again",
        )
    return records


def _member_path(info: zipfile.ZipInfo, prefix: str, address: str) -> str:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise StageError(f"{address}: the zip holds a link ({name!r}); refusing it")
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise StageError(f"{address}: the zip entry {name!r} would escape the destination")
    if not name.startswith(prefix):
        raise StageError(f"{address}: unexpected zip entry {name!r} (not under {prefix})")
    rel = name[len(prefix) :]
    if not rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise StageError(f"{address}: the zip entry {name!r} would escape the destination")
    return rel


def _copy_out(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, size: int, address: str, rel: str
) -> str:
    """Copy one entry (CRC checked by zipfile), never writing more than its declared size.

    A large entry's md5 is computed in a helper thread, one chunk behind the copy (hashlib
    releases the GIL): with two cores, unpacking then takes about as long as the slower of
    hashing and copying instead of both (docs/performance.md).
    """
    digest = hashlib.md5()
    written = 0
    hasher = ThreadPoolExecutor(max_workers=1) if size >= HASH_THREAD_BYTES else None
    hashing: Future[None] | None = None
    try:
        with archive.open(info) as src, open(target, "xb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > size:
                    raise StageError(f"{address}: {rel} is larger than declared; refusing it")
                if hasher is None:
                    digest.update(chunk)
                else:
                    if hashing is not None:
                        hashing.result()  # updates stay in order; at most two chunks held
                    hashing = hasher.submit(digest.update, chunk)
                out.write(chunk)
            if hashing is not None:
                hashing.result()
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        # A damaged deflated entry fails in zlib (or ends early), not as BadZipFile.
        raise StageError(
            f"{address}: {rel} is corrupt in the zip ({exc})", hint="re-run to download it again"
        ) from None
    except (NotImplementedError, RuntimeError) as exc:  # unknown compression, encrypted entry
        raise StageError(f"{address}: {rel} cannot be unpacked ({exc})") from None
    except FileExistsError:
        raise StageError(f"{address}: the zip holds {rel} twice") from None
    except OSError as exc:
        raise StageError(f"{address}: cannot write {target}: {exc.strerror}") from None
    finally:
        if hasher is not None:
            hasher.shutdown()
    return digest.hexdigest()


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


# -- DICOM inventory -------------------------------------------------------------------------
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


def open_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a staged resource folder (for later steps that read it)."""
    data = _read_manifest(Path(folder) / MANIFEST)
    if data is None:
        raise StageError(f"{folder} has no valid {MANIFEST}; stage it in first")
    return data
