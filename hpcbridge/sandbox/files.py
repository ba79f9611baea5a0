"""Files of resources: selection by path (exact, ``folder/``, prefix or glob), download of one
file, zip downloads of many, listings, and deletion.
"""

from __future__ import annotations

import fnmatch
import re
from email.utils import formatdate
from pathlib import Path
from typing import IO, Any

from . import uploads
from .filestore import StoredFile
from .http import HttpError, Reply, Request
from .streams import ZipEntry, write_zip
from .views import Owner, Site, not_found, table

CONTENT_TYPES = {
    ".txt": "text/plain",
    ".xml": "text/xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".pdf": "application/pdf",
    ".html": "text/html",
    ".svg": "image/svg+xml",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
}
FILE_COLUMNS = "Name Size URI collection file_tags file_format file_content cat_ID digest".split()
Selected = list[tuple[Owner, dict[str, Any], StoredFile]]


def resources_of(site: Site, owner: Owner) -> list[dict[str, Any]]:
    return site.store.resources(owner.kind, owner.id, owner.inout)


def _select(
    site: Site, pairs: list[tuple[Owner, dict[str, Any]]], path: str
) -> tuple[Selected, bool]:
    """Files addressed by ``path`` (exact file, folder/, folder or prefix*); and whether the
    path named one file exactly."""
    selected = []
    exact = False
    for owner, res in pairs:
        for f in site.store.files(res["id"]):
            if not path or _path_matches(f.path, path):
                selected.append((owner, res, f))
                exact = exact or (f.path == path)
    return selected, exact and len(selected) == 1


def files(
    site: Site,
    req: Request,
    owners: list[Owner],
    found: list[tuple[Owner, dict[str, Any]]] | None,
    path: str,
) -> Reply:
    """Answer ``.../files[/path]`` of the resources ``found`` (None: all of the owners')."""
    pairs = found if found is not None else [(o, r) for o in owners for r in resources_of(site, o)]
    if req.method in ("PUT", "POST"):
        if not pairs:
            raise not_found("Unable to find the specified catalog.")
        return uploads.upload(site, req, pairs[0][1], path)
    selected, exact = _select(site, pairs, path)
    if req.method == "DELETE":
        if not selected:
            return _missing(req, "No matched files")
        for res_id in {r["id"] for _, r, _ in selected}:
            site.store.delete_files(res_id, [f.path for _, r, f in selected if r["id"] == res_id])
        return Reply()
    if exact and "format" not in req.query:
        return _send_file(site, selected[0][2])
    if path and not selected:
        return _missing(req, "Unable to find file.")
    fmt = req.query.get("format", "json").lower()
    if fmt == "zip":
        return _zip(site, req, selected, owners)
    if fmt in ("tar", "tar.gz"):
        raise HttpError(406, f"The sandbox serves zip downloads only, not {fmt}.")
    return _listing(req, selected)


def _listing(req: Request, selected: Selected) -> Reply:
    rows = [
        {
            "Name": f.name,
            "Size": f.size,
            "URI": f"{owner.base_uri}/resources/{res['id']}/files/{f.path}",
            "collection": res["label"],
            "file_tags": f.tags,
            "file_format": f.format,
            "file_content": f.content,
            "cat_ID": res["id"],
            "digest": f.digest,
        }
        for owner, res, f in selected
    ]
    for key in ("file_format", "file_content"):
        if key in req.query:
            want = "" if req.query[key] == "NULL" else req.query[key]
            rows = [r for r in rows if r[key] == want]
    return table(
        req,
        rows,
        FILE_COLUMNS,
        meta={"title": "Files"},
        columns_meta=[{"key": "URI", "serverRoot": ""}],
        total_meta=False,
        fixed=True,
    )


def _missing(req: Request, reason: str) -> Reply:
    if req.flag("accept-not-found"):
        return Reply(204)
    raise not_found(reason)


def _send_file(site: Site, f: StoredFile) -> Reply:
    ctype = CONTENT_TYPES.get(Path(f.path).suffix.lower(), "application/octet-stream")
    headers = {
        "Last-Modified": formatdate(f.mtime, usegmt=True),
        "Cache-Control": "must-revalidate",
    }
    if ctype.startswith("application/") or ctype == "text/html":
        headers["Content-Disposition"] = f'attachment; filename="{f.name}";'
    path = site.store.file_path(f.resource_id, f.path)
    return Reply(200, content_type=ctype, headers=headers, file=path)


def _zip(site: Site, req: Request, selected: Selected, owners: list[Owner]) -> Reply:
    if not selected:
        return _missing(req, "No matching files found.")
    structure = req.query.get("structure", "default")
    prefix = ""
    if any(o.kind in ("scan", "experiment", "assessor") for o in owners) and req.flag(
        "projectIncludedInPath"
    ):
        prefix = _project_of(owners[0]) + "/"
    entries = [
        ZipEntry(
            prefix + _zip_path(owner, res, f, structure),
            site.store.file_path(res["id"], f.path),
            f.size,
            f.mtime,
        )
        for owner, res, f in selected
    ]
    name = owners[0].archive_name or "download"
    try:
        level = int(req.query.get("compression", "0"))
    except ValueError:
        level = 0

    def stream(sink: IO[bytes]) -> None:
        write_zip(entries, sink, compression=level)

    return Reply(
        200,
        content_type="application/zip",
        stream=stream,
        headers={"Content-Disposition": f'attachment; filename="{name}.zip";'},
    )


def _project_of(owner: Owner) -> str:
    if owner.base_uri.startswith("/data/projects/"):
        return owner.base_uri.split("/")[3]
    return owner.zip_prefix.split("/")[0]


def _path_matches(file_path: str, wanted: str) -> bool:
    if "*" in wanted or "?" in wanted:
        return fnmatch.fnmatchcase(file_path, wanted)
    if wanted.endswith("/"):
        return file_path.startswith(wanted)
    return file_path == wanted or file_path.startswith(wanted + "/")


def _zip_path(owner: Owner, res: dict[str, Any], f: StoredFile, structure: str) -> str:
    if structure == "simplified":
        base = owner.zip_prefix
        if owner.kind == "scan":
            base = base.rsplit("/", 1)[0] + "/" + owner.cat_id
        return f"{base}/{res['label']}/{f.path}"
    if structure == "improved":
        if owner.kind == "scan":
            kind = re.sub(r'[/\\:*?"<>|]', "_", owner.cat_desc)
            return f"scans/{owner.cat_id}_{kind}/{res['label']}/{f.path}"
        return f"resources/{res['label']}/{f.path}"
    return f"{owner.zip_prefix}/resources/{res['label']}/files/{f.path}"
