"""Uploads into a resource: raw bodies, multipart forms and archives extracted on the way in,
spooled to temporary files first so a refused upload changes nothing.
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .filestore import PathRefused, safe_relpath
from .http import HttpError, Reply, Request
from .streams import BodyError, iter_multipart
from .views import Site

# RequestUtil.supported_upload_types: raw bodies XNAT accepts without inbody=true.
RAW_UPLOAD_TYPES = (
    "application/octet-stream",
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/x-gzip",
    "application/gzip",
    "application/dicom",
    "text/plain",
    "text/xml",
    "application/xml",
    "application/pdf",
    "image/",
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
Spooled = list[tuple[str, tuple[Path, int, str]]]


def upload(site: Site, req: Request, res: dict[str, Any], path: str) -> Reply:
    """Store the request's files in ``res``; name the duplicates it kept, as XNAT does."""
    # Read from the URL's query alone: a multipart form adds its fields to it while spooling.
    options = (req.flag("overwrite"), req.flag("extract"))
    attrs = {k: req.query.get(k, "") for k in ("format", "content", "tags")}
    uploads: Spooled = []
    try:
        uploads = _spool_body(site, req, path)
        if not uploads or all(size == 0 for _, (_, size, _) in uploads):
            raise HttpError(
                400,
                "You tried to PUT to this service, but didn't provide any"
                " data (found 0 bytes). Please include the data.",
            )
        duplicates = _store(site, res["id"], uploads, options, attrs)
    except BodyError as exc:
        raise HttpError(400, str(exc)) from None
    finally:
        _unlink(uploads)
    if duplicates:
        return Reply(200, json.dumps({"duplicates": duplicates}).encode(), "text/html")
    return Reply(200)


def _spool_body(site: Site, req: Request, path: str) -> Spooled:
    ctype = req.headers.get("Content-Type", "")
    inbody = req.flag("inbody")
    if ctype.lower().startswith("multipart/form-data"):
        if inbody:
            raise HttpError(406, "Multipart uploads cannot be combined with inbody=true.")
        return _multipart(site, req, ctype, path)
    if not inbody and not ctype.lower().startswith(RAW_UPLOAD_TYPES):
        raise HttpError(
            400,
            "Unable to identify upload format: send inbody=true or a multipart/form-data body.",
        )
    if not path:
        raise HttpError(400, "A raw upload needs the file path in the URL.")
    return [(path, site.store.spool(req.body.chunks()))]


def _store(
    site: Site, rid: int, uploads: Spooled, options: tuple[bool, bool], attrs: dict[str, str]
) -> list[str]:
    """Move the spooled uploads into the resource; returns the duplicates kept."""
    overwrite, extract = options
    duplicates: list[str] = []
    for name, spooled in uploads:
        if extract and name.lower().endswith(ARCHIVE_SUFFIXES):
            duplicates += _extract(site, rid, spooled[0], name, overwrite, attrs)
            continue
        try:
            stored = site.store.add_file(rid, name, spooled, overwrite=overwrite, **attrs)
        except PathRefused:
            raise HttpError(400, f"Invalid file path {name!r}.") from None
        if not stored:
            duplicates.append(safe_relpath(name))
    return duplicates


def _unlink(spooled: Spooled) -> None:
    for _, (tmp, _, _) in spooled:
        tmp.unlink(missing_ok=True)


def _multipart(site: Site, req: Request, ctype: str, path: str) -> Spooled:
    match = re.search(r'boundary="?([^";]+)"?', ctype)
    if not match:
        raise HttpError(400, "multipart/form-data body without a boundary")
    uploads: Spooled = []
    try:
        for part, chunks in iter_multipart(req.body.read, match.group(1).encode()):
            if not part.filename:
                value = b"".join(chunks).decode("utf-8", "replace")
                if part.name and part.name not in req.query:
                    req.query[part.name] = value
                continue
            # With a path in the URL the stored name is that path, as FileList does.
            name = path if path and not uploads else part.filename
            uploads.append((name, site.store.spool(chunks)))
    except BaseException:
        _unlink(uploads)
        raise
    return uploads


def _extract(
    site: Site, rid: int, archive: Path, name: str, overwrite: bool, attrs: dict[str, str]
) -> list[str]:
    """Unpack an uploaded archive into the resource root; returns the kept duplicates."""
    duplicates = []
    # Spool every entry before storing any, so a refused entry (``..``, a link, a broken
    # archive) leaves the resource as it was instead of half-extracted.
    spooled: Spooled = []
    try:
        for member, stream in _archive_members(archive, name):
            try:
                rel = safe_relpath(member)
            except PathRefused:
                raise HttpError(400, f"Archive entry {member!r} escapes the resource.") from None
            with stream as fh:
                spooled.append((rel, site.store.spool(fh)))
        for rel, entry in spooled:
            if not site.store.add_file(rid, rel, entry, overwrite=overwrite, **attrs):
                duplicates.append(rel)
    finally:
        _unlink(spooled)
    return duplicates


def _archive_members(archive: Path, name: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(entry name, open entry) for each regular file of a zip or tar; links are refused."""
    try:
        if name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield info.filename, zf.open(info)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    if member.issym() or member.islnk():
                        raise HttpError(400, f"Archive entry {member.name!r} is a link.")
                    stream = tf.extractfile(member) if member.isfile() else None
                    if stream is not None:
                        yield member.name, stream
    except (zipfile.BadZipFile, tarfile.TarError):
        raise HttpError(400, f"{name} is not a readable archive.") from None
