"""Checking and unpacking a downloaded resource zip, and verifying staged files later.

Every entry is checked against XNAT's listing (name, size, digest) and against the limits
(expansion ratio, total size) before and while it is unpacked; nothing is written outside the
staging folder, through a link, or beyond an entry's declared size.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import zipfile
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import StageError
from ..units import human_size
from ..xnat.model import FileEntry
from .layout import CHUNK, MANIFEST, Limits

# Entries at least this large are hashed in a helper thread while they are unpacked; for
# smaller ones starting the thread costs more than the overlap saves.
HASH_THREAD_BYTES = 8 * CHUNK
AGAIN = "re-run to download it again"


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("hpcbridge_manifest") == 1 else None


def open_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a staged resource folder (for later steps that read it)."""
    data = _read_manifest(Path(folder) / MANIFEST)
    if data is None:
        raise StageError(f"{folder} has no valid {MANIFEST}; stage it in first")
    return data


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
            f"{address}: the download is not a valid zip (truncated or corrupt)", hint=AGAIN
        ) from None
    records = []
    total = 0
    with archive:
        for info in [i for i in archive.infolist() if not i.is_dir()]:
            rel = _member_path(info, prefix, address)
            want = _expected(info, rel, expected.get(rel), limits, address)
            total += info.file_size
            if total > limits.max_total_bytes:
                raise StageError(
                    f"{address}: the zip unpacks to more than "
                    f"{human_size(limits.max_total_bytes)}; refusing it"
                )
            records.append(_unpack(archive, info, files_dir, rel, want, address))
    missing = sorted(set(expected) - {r["path"] for r in records})
    if missing:
        raise StageError(
            f"{address}: the zip lacks {len(missing)} file(s) XNAT lists, e.g. {missing[0]}",
            hint=AGAIN,
        )
    return records


def _expected(
    info: zipfile.ZipInfo, rel: str, want: FileEntry | None, limits: Limits, address: str
) -> FileEntry:
    """XNAT's listing of the entry, refusing one it does not list, the wrong size or a bomb."""
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
    return want


def _unpack(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    files_dir: Path,
    rel: str,
    want: FileEntry,
    address: str,
) -> dict[str, Any]:
    """One entry unpacked and its digest checked; its record for the manifest."""
    target = files_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = _copy_out(archive, info, target, want.size, address, rel)
    if want.digest and digest != want.digest:
        raise StageError(f"{address}: {rel} has md5 {digest}, XNAT lists {want.digest}")
    return {
        "path": rel,
        "size": want.size,
        "md5": digest,
        "xnat_digest": want.digest,
        "uri": want.uri,
    }


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
    hasher = ThreadPoolExecutor(max_workers=1) if size >= HASH_THREAD_BYTES else None
    try:
        with archive.open(info) as src, open(target, "xb") as out:
            _copy_hashing(src, out, digest, hasher, size, f"{address}: {rel}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        # A damaged deflated entry fails in zlib (or ends early), not as BadZipFile.
        raise StageError(f"{address}: {rel} is corrupt in the zip ({exc})", hint=AGAIN) from None
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


def _copy_hashing(
    src: Any, out: Any, digest: Any, hasher: ThreadPoolExecutor | None, size: int, name: str
) -> None:
    """Copy ``src`` to ``out`` and hash it (in ``hasher``'s thread if given), up to ``size``."""
    written = 0
    hashing: Future[None] | None = None
    while chunk := src.read(CHUNK):
        written += len(chunk)
        if written > size:
            raise StageError(f"{name} is larger than declared; refusing it")
        if hasher is None:
            digest.update(chunk)
        else:
            if hashing is not None:
                hashing.result()  # updates stay in order; at most two chunks held
            hashing = hasher.submit(digest.update, chunk)
        out.write(chunk)
    if hashing is not None:
        hashing.result()
