"""The experiment (image session) level of the archive: listings, with XNAT's join on scan
xpaths; creation and lookup by label within a project or by accession ID.
"""

from __future__ import annotations

from typing import Any

from . import resources, scans
from .http import HttpError, Reply, Request
from .store import VALID_LABEL
from .views import Ctx, Owner, Site, cells, item, not_found, only_get, qs, table

EXPT_COLUMNS = "ID project date xsiType label insert_date URI".split()
SCAN_XPATHS = ("xnat:imagescandata/", "xnat:imagesessiondata/scans/scan/")


def _row(e: dict[str, Any]) -> dict[str, Any]:
    spec = (
        "ID=id project date xsiType=xsi_type label insert_date URI xnat:subjectassessordata/id=id"
        " subject_ID=subject_id subject_label xnat:imagesessiondata/subject_id=subject_id"
        " xnat:imagesessiondata/label=label xnat:imagesessiondata/id=id insert_user"
    )
    return cells(e, spec, URI=f"/data/experiments/{e['id']}")


def _rows(site: Site, ctx: Ctx, all_experiments: bool, req: Request) -> list[dict[str, Any]]:
    project = ctx.project["id"] if ctx.project else None
    subject = ctx.subject["id"] if ctx.subject else None
    if all_experiments and req.query.get("project"):
        project = None  # the project= filter below narrows the rows
    rows = [_row(e) for e in site.store.experiments(project, subject)]
    wanted = req.query.get("xsiType")
    if wanted:
        rows = [r for r in rows if _type_matches(r["xsiType"], wanted)]
    return rows


def route(site: Site, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
    """``experiments[/{id or label}/...]`` below a project or subject."""
    if not rest:
        return listing(site, req, ctx)
    return put_or_get(site, req, ctx, rest[0], rest[1:])


def listing(site: Site, req: Request, ctx: Ctx, all_experiments: bool = False) -> Reply:
    only_get(req)
    rows = _rows(site, ctx, all_experiments, req)
    columns = req.query.get("columns", "").lower()
    if any(x in columns for x in SCAN_XPATHS):
        rows = _expand_scans(site, rows, with_resources="/file/label" in columns)
    defaults = list(EXPT_COLUMNS)
    meta: dict[str, str] = {}
    if all_experiments:
        defaults[-1:-1] = ["subject_ID", "subject_label"]
        meta["title"] = "Matching experiments"
    else:
        defaults.append("xnat:subjectassessordata/id")
    return table(req, rows, defaults, meta=meta)


def _expand_scans(
    site: Site, rows: list[dict[str, Any]], with_resources: bool
) -> list[dict[str, Any]]:
    """One row per session and scan (and resource), as XNAT's join on scan xpaths gives."""
    out = []
    for row in rows:
        found = site.store.scans(row["ID"])
        if not found:
            out.append(dict(row, **_scan_xpath_cells(None)))
        for scan in found:
            cells = _scan_xpath_cells(scan)
            labels = [r["label"] for r in site.store.resources("scan", str(scan["pk"]))]
            for label in (labels or [""]) if with_resources else [None]:
                extra = dict(cells)
                if label is not None:
                    extra["xnat:imagescandata/file/label"] = label
                out.append(dict(row, **extra))
    return out


def put_or_get(site: Site, req: Request, ctx: Ctx, ident: str, rest: list[str]) -> Reply:
    assert ctx.project is not None
    subject_id = ctx.subject["id"] if ctx.subject else None
    expt = site.store.experiment(ident, ctx.project["id"], subject_id)
    if not rest and req.method in ("PUT", "POST"):
        return _put(site, req, ctx, ident, expt)
    if expt is None:
        raise not_found("Unable to find the specified experiment.")
    ctx.experiment = expt
    if ctx.subject is None:
        ctx.subject = site.store.subject(expt["subject_id"])
        if rest and rest[0] == "scans":
            # XNAT has no /projects/{p}/experiments/{e}/scans route: prefix routing lands on
            # the experiment itself with "scans" as the unused remaining part.
            rest = []
    return experiment(site, req, ctx, rest)


def _put(site: Site, req: Request, ctx: Ctx, label: str, expt: dict[str, Any] | None) -> Reply:
    assert ctx.project is not None
    xsi = req.query.get("xsiType", "")
    date = qs(req, xsi, "date")
    if expt is not None:
        if date is not None:
            site.store.update_experiment(expt["id"], date=date)
        return Reply(200, expt["id"].encode())
    if not xsi:
        raise HttpError(417, "Need PUT Contents")
    if not xsi.endswith("SessionData") or xsi == "xnat:imageSessionData":
        raise HttpError(400, f"Unsupported experiment type {xsi}")
    if not VALID_LABEL.match(label):
        raise HttpError(417, "Invalid character in experiment label.")
    subj = _subject_for_put(site, req, ctx, xsi)
    expt = site.store.create_experiment(
        ctx.project["id"], subj["id"], label, xsi, req.user or "", date or ""
    )
    return Reply(201, expt["id"].encode())


def _subject_for_put(site: Site, req: Request, ctx: Ctx, xsi: str) -> dict[str, Any]:
    """The subject a new experiment goes under: the URL's (created when missing) or the
    query's ``subject_ID``."""
    assert ctx.project is not None
    if ctx.subject is not None:
        return ctx.subject
    if "new_subject" in ctx.extra:
        new_label = ctx.extra["new_subject"]
        if not VALID_LABEL.match(new_label):
            raise HttpError(417, "Invalid character in subject label.")
        return site.store.create_subject(ctx.project["id"], new_label, req.user or "")
    sref = req.query.get("subject_ID") or qs(req, xsi, "subject_ID")
    subj = site.store.subject(sref, ctx.project["id"]) if sref else None
    if subj is None:
        raise HttpError(400, "Unable to identify the subject for this experiment.")
    return subj


def experiment(site: Site, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
    expt = ctx.experiment
    assert expt is not None
    if not rest:
        if req.method == "DELETE":
            site.store.delete_owner("experiment", expt["id"])
            return Reply()
        if req.method in ("PUT", "POST"):
            return _put(site, req, ctx, expt["label"], expt)
        return _item(site, req, expt)
    what = rest[0]
    if what == "status":
        return Reply.text("active")
    if what == "scans":
        return scans.route(site, req, ctx, rest[1:])
    if what == "assessors":
        return scans.assessors(site, req, ctx, rest[1:])
    owner = Owner(
        "experiment",
        expt["id"],
        ctx.experiment_uri(),
        expt["label"],
        cat_id=expt["id"],
        archive_name=expt["label"],
    )
    return resources.owner_tail(site, req, owner, rest)


def _item(site: Site, req: Request, expt: dict[str, Any]) -> Reply:
    spec = "ID=id label project subject_ID=subject_id date modality"
    fields = cells(expt, spec, modality=_modality(expt["xsi_type"]))
    children = [scans.scan_child(site, expt, s) for s in site.store.scans(expt["id"])]
    listed = [{"field": "scans/scan", "items": children}] if children else []
    return item(req, expt["xsi_type"], fields, listed)


def _type_matches(actual: str, wanted: str) -> bool:
    for want in wanted.split(","):
        if want == actual or want in ("xnat:experimentData", "xnat:subjectAssessorData"):
            return True
        if want == "xnat:imageSessionData" and actual.endswith("SessionData"):
            return True
    return False


def _scan_xpath_cells(scan: dict[str, Any] | None) -> dict[str, str]:
    cells = {}
    for name in ("id", "type", "quality", "note", "frames", "series_description", "xsitype"):
        key = "ID" if name == "id" else ("xsi_type" if name == "xsitype" else name)
        value = "" if scan is None else str(scan.get("scan_id" if key == "ID" else key, ""))
        cells[f"xnat:imagescandata/{name}"] = value
        cells[f"xnat:imagesessiondata/scans/scan/{name}"] = value
    return cells


def _modality(xsi: str) -> str:
    name = xsi.split(":")[-1].replace("SessionData", "").replace("ScanData", "")
    return name.upper()
