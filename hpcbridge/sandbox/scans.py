"""An experiment's children: its scans (by ID or type, comma lists, ``*``/``ALL``) and its
assessors, each with resources (an assessor's split into ``in`` and ``out``).
"""

from __future__ import annotations

import re
from typing import Any

from . import resources
from .http import HttpError, Reply, Request
from .store import VALID_LABEL
from .views import Ctx, Owner, Site, cells, child_item, item, not_found, only_get, qs_fields, table

SCAN_COLUMNS = "xnat_imagescandata_id ID type quality xsiType note series_description URI".split()


def _uri(expt: dict[str, Any]) -> str:
    return f"/data/experiments/{expt['id']}"


def _fields(expt: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    spec = "ID=scan_id type series_description quality image_session_ID xnat_imagescandata_id=pk"
    fields = cells(scan, spec + " project", image_session_ID=expt["id"], project=expt["project"])
    if scan["note"]:
        fields["note"] = scan["note"]
    if scan["frames"]:
        fields["frames"] = int(scan["frames"]) if scan["frames"].isdigit() else scan["frames"]
    return fields


def _file_children(site: Site, expt: dict[str, Any], scan: dict[str, Any]) -> list[Any]:
    files = []
    for res in site.store.resources("scan", str(scan["pk"])):
        count, size = site.store.resource_stats(res["id"])
        uri = f"{_uri(expt)}/scans/{scan['scan_id']}/resources/{res['id']}"
        spec = "label format content file_count file_size xnat_abstractresource_id=id URI"
        fields = cells(res, spec, file_count=count, file_size=size, URI=uri)
        files.append(child_item("xnat:resourceCatalog", fields))
    return [{"field": "file", "items": files}] if files else []


def scan_child(site: Site, expt: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    """A scan as its experiment's JSON lists it, with its resources as children."""
    return child_item(scan["xsi_type"], _fields(expt, scan), _file_children(site, expt, scan))


def _match(site: Site, expt: dict[str, Any], spec: str) -> list[dict[str, Any]]:
    found = site.store.scans(expt["id"])
    if spec in ("*", "ALL"):
        return found
    wanted = [w.replace("[SLASH]", "/").replace("[COMMA]", ",") for w in spec.split(",")]
    return [
        scan
        for scan in found
        if any(
            scan["scan_id"] == w or scan["type"] == w or (w == "NULL" and not scan["type"])
            for w in wanted
        )
    ]


def _owner(ctx: Ctx, scan: dict[str, Any]) -> Owner:
    expt = ctx.experiment
    assert expt is not None
    sid = scan["scan_id"]
    folder = f"{sid}-{re.sub(r'[^A-Za-z0-9_]', '_', scan['type'])}" if scan["type"] else sid
    return Owner(
        "scan",
        str(scan["pk"]),
        f"{ctx.experiment_uri()}/scans/{sid}",
        f"{expt['label']}/scans/{folder}",
        category="scans",
        cat_id=sid,
        cat_desc=scan["type"],
        archive_name=expt["label"],
    )


def _listing(site: Site, req: Request, expt: dict[str, Any]) -> Reply:
    only_get(req)
    spec = "xnat_imagescandata_id=pk ID=scan_id type quality xsiType=xsi_type note"
    rows = [
        cells(s, f"{spec} series_description frames URI", URI=f"{_uri(expt)}/scans/{s['scan_id']}")
        for s in site.store.scans(expt["id"])
    ]
    # ScanList overwrites the query's WHERE clause with the session id, so XNAT ignores
    # filters here; applying them would let clients pass here and fail on a real XNAT.
    return table(req, rows, SCAN_COLUMNS, total_meta=True, filters=False)


def route(site: Site, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
    expt = ctx.experiment
    assert expt is not None
    if not rest:
        return _listing(site, req, expt)
    spec, tail = rest[0], rest[1:]
    if not tail and req.method in ("PUT", "POST"):
        return _put(site, req, expt, spec)
    found = _match(site, expt, spec)
    if not found:
        raise not_found(f"Unable to find scan {spec}")
    if tail:
        return resources.owner_tail(site, req, [_owner(ctx, s) for s in found], tail)
    if req.method == "DELETE":
        for scan in found:
            site.store.delete_owner("scan", str(scan["pk"]))
        return Reply()
    scan = found[0]
    return item(req, scan["xsi_type"], _fields(expt, scan), _file_children(site, expt, scan))


def _put(site: Site, req: Request, expt: dict[str, Any], sid: str) -> Reply:
    existing = site.store.scan(expt["id"], sid)
    xsi = req.query.get("xsiType") or (existing["xsi_type"] if existing else "")
    if xsi == "xnat:imageScanData" or (not xsi and existing is None):
        raise HttpError(400, "Please retry with the specification of a particular modality")
    if existing is not None and xsi != existing["xsi_type"]:
        raise HttpError(409, "Cannot change the type of an existing scan.")
    names = ("type", "series_description", "quality", "note", "frames")
    site.store.put_scan(expt["id"], sid, xsi, **qs_fields(req, xsi, names))
    return Reply()


def assessors(site: Site, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
    expt = ctx.experiment
    assert expt is not None
    if not rest:
        return _assessor_listing(site, req, expt)
    ident, tail = rest[0], rest[1:]
    found = site.store.assessor(expt["id"], ident)
    if not tail and req.method in ("PUT", "POST"):
        return _put_assessor(site, req, expt, ident, found)
    if found is None:
        raise not_found(f"Unable to find assessor {ident}")
    if not tail:
        if req.method == "DELETE":
            site.store.delete_owner("assessor", found["id"])
            return Reply()
        fields = cells(found, "ID=id label project imageSession_ID", imageSession_ID=expt["id"])
        return item(req, found["xsi_type"], fields, [])
    inout = "out"
    if tail[0] in ("in", "out"):
        inout, tail = tail[0], tail[1:]
    if not tail:
        raise not_found()
    owner = Owner(
        "assessor",
        found["id"],
        f"{ctx.experiment_uri()}/assessors/{found['id']}/{inout}",
        f"{expt['label']}/assessors/{found['label']}/{inout}",
        category="assessors",
        cat_id=found["id"],
        inout=inout,
        archive_name=expt["label"],
    )
    return resources.owner_tail(site, req, owner, tail)


def _assessor_listing(site: Site, req: Request, expt: dict[str, Any]) -> Reply:
    spec = "ID=id label xsiType=xsi_type project insert_date session_ID session_label URI"
    session = {"session_ID": expt["id"], "session_label": expt["label"]}
    rows = [
        cells(a, spec, **session, URI=f"{_uri(expt)}/assessors/{a['id']}")
        for a in site.store.assessors(expt["id"])
    ]
    return table(req, rows, "ID label xsiType project insert_date URI".split())


def _put_assessor(
    site: Site, req: Request, expt: dict[str, Any], ident: str, found: dict[str, Any] | None
) -> Reply:
    if found is not None:
        return Reply(200, found["id"].encode())
    xsi = req.query.get("xsiType", "")
    if not xsi:
        raise HttpError(417, "Need PUT Contents")
    if not VALID_LABEL.match(ident):
        raise HttpError(417, "Invalid character in assessor label.")
    created = site.store.create_assessor(expt, ident, xsi, req.user or "")
    return Reply(201, created["id"].encode())
