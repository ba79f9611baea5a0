"""The archive routes of the sandbox: projects down to files, as XNAT 1.8's REST API answers them.

Paths are resolved the way XNAT's Restlet templates do (``/data`` = ``/REST``, with or without
``/archive``; projects by ID or alias; subjects and experiments by label within a project or by
accession ID; scans by ID or type; resources by label or numeric id). See docs/sandbox.md for
what is implemented and where the sandbox knowingly differs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import IO, Any

from .auth import Authority
from .http import HttpError, Reply, Request
from .listing import CONTROL_PARAMS, render_table
from .store import VALID_LABEL, PathRefused, Store, StoredFile, safe_relpath
from .streams import BodyError, ZipEntry, iter_multipart, write_zip

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
SCAN_COLUMNS = [
    "xnat_imagescandata_id",
    "ID",
    "type",
    "quality",
    "xsiType",
    "note",
    "series_description",
    "URI",
]
RESOURCE_COLUMNS = [
    "xnat_abstractresource_id",
    "label",
    "element_name",
    "category",
    "cat_id",
    "cat_desc",
    "file_count",
    "file_size",
    "tags",
    "content",
    "format",
]
FILE_COLUMNS = [
    "Name",
    "Size",
    "URI",
    "collection",
    "file_tags",
    "file_format",
    "file_content",
    "cat_ID",
    "digest",
]
EXPT_COLUMNS = ["ID", "project", "date", "xsiType", "label", "insert_date", "URI"]
SCAN_XPATHS = ("xnat:imagescandata/", "xnat:imagesessiondata/scans/scan/")


@dataclass
class Owner:
    """Something resources hang from: a project, subject, experiment, scan or assessor."""

    kind: str
    id: str  # the key resources are stored under (scan: its numeric pk)
    base_uri: str  # prefix of file URIs
    zip_prefix: str  # path inside zips, before resources/
    category: str = "resources"
    cat_id: str = ""
    cat_desc: str = " "
    inout: str = ""
    archive_name: str = ""


@dataclass
class Ctx:
    project: dict[str, Any] | None = None
    subject: dict[str, Any] | None = None
    experiment: dict[str, Any] | None = None
    via_subject: bool = False  # the URL named both project and subject
    extra: dict[str, Any] = field(default_factory=dict)


def not_found(reason: str) -> HttpError:
    return HttpError(404, reason)


class Archive:
    def __init__(
        self, store: Store, authority: Authority, cut_point: Callable[[], int | None]
    ) -> None:
        self.store = store
        self.auth = authority
        self.cut_point = cut_point

    # -- entry ---------------------------------------------------------------------------
    def handle(self, req: Request, segs: list[str]) -> Reply:
        head = segs[0]
        if head == "projects":
            return self._projects(req, segs[1:])
        if head == "subjects":
            if len(segs) == 1:
                return self._subject_list(req, None)
            subj = self.store.subject(segs[1])
            if subj is None:
                raise not_found(f"Unable to find the specified subject: {segs[1]}")
            proj = self.store.project(subj["project"])
            return self._subject(req, Ctx(project=proj, subject=subj), segs[2:])
        if head == "experiments":
            if len(segs) == 1:
                return self._experiment_list(req, Ctx(), all_experiments=True)
            expt = self.store.experiment(segs[1])
            if expt is None:
                raise not_found("Unable to find the specified experiment.")
            return self._experiment(req, self._ctx_for(expt, via_subject=False), segs[2:])
        raise not_found("The server has not found anything matching the request URI")

    def _ctx_for(self, expt: dict[str, Any], via_subject: bool) -> Ctx:
        return Ctx(
            project=self.store.project(expt["project"]),
            subject=self.store.subject(expt["subject_id"]),
            experiment=expt,
            via_subject=via_subject,
        )

    # -- projects ------------------------------------------------------------------------
    def _projects(self, req: Request, segs: list[str]) -> Reply:
        if not segs:
            if req.method != "GET":
                raise HttpError(405, "Method Not Allowed")
            rows = [self._project_row(p) for p in self.store.projects()]
            return self._table(
                req,
                rows,
                ["ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"],
            )
        pid = segs[0]
        proj = self.store.project(pid)
        rest = segs[1:]
        if not rest:
            return self._project_item(req, pid, proj)
        if proj is None:
            raise not_found(f"Unable to identify project {pid}")
        ctx = Ctx(project=proj)
        what = rest[0]
        if what == "subjects":
            if len(rest) == 1:
                return self._subject_list(req, proj)
            return self._subject_put_or_get(req, ctx, rest[1], rest[2:])
        if what == "experiments":
            if len(rest) == 1:
                return self._experiment_list(req, ctx)
            return self._experiment_put_or_get(req, ctx, rest[1], rest[2:])
        owner = Owner(
            "project",
            proj["id"],
            f"/data/projects/{proj['id']}",
            proj["id"],
            archive_name=proj["id"],
        )
        return self._owner_tail(req, owner, rest)

    def _project_row(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "ID": p["id"],
            "secondary_ID": p["secondary_id"],
            "name": p["name"],
            "description": p["description"],
            "pi_firstname": p["pi_firstname"],
            "pi_lastname": p["pi_lastname"],
            "URI": f"/data/projects/{p['id']}",
            "insert_date": p["insert_date"],
            "insert_user": p["insert_user"],
        }

    def _project_item(self, req: Request, pid: str, proj: dict[str, Any] | None) -> Reply:
        if req.method == "PUT" or req.method == "POST":
            return self._put_project(req, pid, proj)
        if proj is None:
            raise not_found(f"Unable to identify project {pid}")
        if req.method == "DELETE":
            self.store.delete_owner("project", proj["id"])
            return Reply()
        fields = {
            "ID": proj["id"],
            "secondary_ID": proj["secondary_id"],
            "name": proj["name"],
            "description": proj["description"],
        }
        return self._item(req, "xnat:projectData", fields, [])

    def _put_project(self, req: Request, pid: str, proj: dict[str, Any] | None) -> Reply:
        if not self.auth.is_admin(req.user):
            raise HttpError(
                403, "Specified user account has insufficient create privileges for projects."
            )
        if not VALID_LABEL.match(pid):
            raise HttpError(417, "Invalid character in project ID.")
        if proj is None:
            fields = {"name": pid, "secondary_id": pid}
            for name in ("name", "secondary_ID", "description", "pi_firstname", "pi_lastname"):
                value = _qs(req, "xnat:projectData", name)
                if value is not None:
                    fields[name.lower()] = value
            self.store.create_project(pid, req.user or "", **fields)
        return Reply()

    # -- subjects ------------------------------------------------------------------------
    def _subject_list(self, req: Request, proj: dict[str, Any] | None) -> Reply:
        if req.method != "GET":
            raise HttpError(405, "Method Not Allowed")
        rows = [
            {
                "ID": s["id"],
                "project": s["project"],
                "label": s["label"],
                "insert_date": s["insert_date"],
                "insert_user": s["insert_user"],
                "URI": f"/data/subjects/{s['id']}",
                "gender": s["gender"],
            }
            for s in self.store.subjects(proj["id"] if proj else None)
        ]
        return self._table(
            req, rows, ["ID", "project", "label", "insert_date", "insert_user", "URI"]
        )

    def _subject_put_or_get(self, req: Request, ctx: Ctx, ident: str, rest: list[str]) -> Reply:
        assert ctx.project is not None
        subj = self.store.subject(ident, ctx.project["id"])
        if not rest and req.method in ("PUT", "POST"):
            if subj is not None:
                return Reply(200, subj["id"].encode())
            if not VALID_LABEL.match(ident):
                raise HttpError(417, "Invalid character in subject label.")
            gender = _qs(req, "xnat:subjectData", "gender") or ""
            subj = self.store.create_subject(ctx.project["id"], ident, req.user or "", gender)
            return Reply(201, subj["id"].encode())
        if subj is None:
            if req.method in ("PUT", "POST") and len(rest) == 2 and rest[0] == "experiments":
                # SubjAssessmentResource.handlePut creates a missing subject (label from the
                # URL) together with the experiment, once the experiment itself is valid.
                ctx.via_subject = True
                ctx.extra["new_subject"] = ident
                return self._experiment_put_or_get(req, ctx, rest[1], [])
            raise not_found(f"Unable to identify subject {ident}")
        ctx.subject = subj
        return self._subject(req, ctx, rest)

    def _subject(self, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
        subj, proj = ctx.subject, ctx.project
        assert subj is not None and proj is not None
        if not rest:
            if req.method == "DELETE":
                self.store.delete_owner("subject", subj["id"])
                return Reply()
            fields = {"ID": subj["id"], "label": subj["label"], "project": subj["project"]}
            if subj["gender"]:
                fields["gender"] = subj["gender"]
            return self._item(req, "xnat:subjectData", fields, [])
        if rest[0] == "experiments":
            ctx.via_subject = True
            if len(rest) == 1:
                return self._experiment_list(req, ctx)
            return self._experiment_put_or_get(req, ctx, rest[1], rest[2:])
        owner = Owner(
            "subject",
            subj["id"],
            f"/data/projects/{proj['id']}/subjects/{subj['id']}",
            subj["label"],
            archive_name=subj["label"],
        )
        return self._owner_tail(req, owner, rest)

    # -- experiments ---------------------------------------------------------------------
    def _experiment_rows(
        self, ctx: Ctx, all_experiments: bool, req: Request
    ) -> list[dict[str, Any]]:
        project = ctx.project["id"] if ctx.project else None
        subject = ctx.subject["id"] if ctx.subject else None
        if all_experiments and req.query.get("project"):
            project = None  # the project= filter below narrows the rows
        rows = []
        for e in self.store.experiments(project, subject):
            rows.append(
                {
                    "ID": e["id"],
                    "project": e["project"],
                    "date": e["date"],
                    "xsiType": e["xsi_type"],
                    "label": e["label"],
                    "insert_date": e["insert_date"],
                    "URI": f"/data/experiments/{e['id']}",
                    "xnat:subjectassessordata/id": e["id"],
                    "subject_ID": e["subject_id"],
                    "subject_label": e["subject_label"],
                    "xnat:imagesessiondata/subject_id": e["subject_id"],
                    "xnat:imagesessiondata/label": e["label"],
                    "xnat:imagesessiondata/id": e["id"],
                    "insert_user": e["insert_user"],
                }
            )
        wanted = req.query.get("xsiType")
        if wanted:
            rows = [r for r in rows if _type_matches(r["xsiType"], wanted)]
        return rows

    def _experiment_list(self, req: Request, ctx: Ctx, all_experiments: bool = False) -> Reply:
        if req.method != "GET":
            raise HttpError(405, "Method Not Allowed")
        rows = self._experiment_rows(ctx, all_experiments, req)
        columns = req.query.get("columns", "").lower()
        if any(x in columns for x in SCAN_XPATHS):
            rows = self._expand_scans(rows, with_resources="/file/label" in columns)
        defaults = list(EXPT_COLUMNS)
        meta: dict[str, str] = {}
        if all_experiments:
            defaults[-1:-1] = ["subject_ID", "subject_label"]
            meta["title"] = "Matching experiments"
        else:
            defaults.append("xnat:subjectassessordata/id")
        return self._table(req, rows, defaults, meta=meta)

    def _expand_scans(
        self, rows: list[dict[str, Any]], with_resources: bool
    ) -> list[dict[str, Any]]:
        """One row per session and scan (and resource), as XNAT's join on scan xpaths gives."""
        out = []
        for row in rows:
            scans = self.store.scans(row["ID"])
            if not scans:
                out.append(dict(row, **_scan_xpath_cells(None)))
            for scan in scans:
                cells = _scan_xpath_cells(scan)
                labels = [r["label"] for r in self.store.resources("scan", str(scan["pk"]))]
                for label in (labels or [""]) if with_resources else [None]:
                    extra = dict(cells)
                    if label is not None:
                        extra["xnat:imagescandata/file/label"] = label
                    out.append(dict(row, **extra))
        return out

    def _experiment_put_or_get(self, req: Request, ctx: Ctx, ident: str, rest: list[str]) -> Reply:
        assert ctx.project is not None
        expt = self.store.experiment(
            ident, ctx.project["id"], ctx.subject["id"] if ctx.subject else None
        )
        if not rest and req.method in ("PUT", "POST"):
            return self._put_experiment(req, ctx, ident, expt)
        if expt is None:
            raise not_found("Unable to find the specified experiment.")
        ctx.experiment = expt
        if ctx.subject is None:
            ctx.subject = self.store.subject(expt["subject_id"])
            if rest and rest[0] == "scans":
                # XNAT has no /projects/{p}/experiments/{e}/scans route: prefix routing lands on
                # the experiment itself with "scans" as the unused remaining part.
                rest = []
        return self._experiment(req, ctx, rest)

    def _put_experiment(
        self, req: Request, ctx: Ctx, label: str, expt: dict[str, Any] | None
    ) -> Reply:
        assert ctx.project is not None
        xsi = req.query.get("xsiType", "")
        date = _qs(req, xsi, "date")
        if expt is not None:
            if date is not None:
                self.store.update_experiment(expt["id"], date=date)
            return Reply(200, expt["id"].encode())
        if not xsi:
            raise HttpError(417, "Need PUT Contents")
        if not xsi.endswith("SessionData") or xsi == "xnat:imageSessionData":
            raise HttpError(400, f"Unsupported experiment type {xsi}")
        if not VALID_LABEL.match(label):
            raise HttpError(417, "Invalid character in experiment label.")
        subj = ctx.subject
        if subj is None and "new_subject" in ctx.extra:
            new_label = ctx.extra["new_subject"]
            if not VALID_LABEL.match(new_label):
                raise HttpError(417, "Invalid character in subject label.")
            subj = self.store.create_subject(ctx.project["id"], new_label, req.user or "")
        if subj is None:
            sref = req.query.get("subject_ID") or _qs(req, xsi, "subject_ID")
            subj = self.store.subject(sref, ctx.project["id"]) if sref else None
            if subj is None:
                raise HttpError(400, "Unable to identify the subject for this experiment.")
        expt = self.store.create_experiment(
            ctx.project["id"], subj["id"], label, xsi, req.user or "", date or ""
        )
        return Reply(201, expt["id"].encode())

    def _experiment(self, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
        expt = ctx.experiment
        assert expt is not None
        if not rest:
            if req.method == "DELETE":
                self.store.delete_owner("experiment", expt["id"])
                return Reply()
            if req.method in ("PUT", "POST"):
                return self._put_experiment(req, ctx, expt["label"], expt)
            return self._experiment_item(req, expt)
        what = rest[0]
        if what == "status":
            return Reply.text("active")
        if what == "scans":
            return self._scans(req, ctx, rest[1:])
        if what == "assessors":
            return self._assessors(req, ctx, rest[1:])
        return self._owner_tail(req, self._experiment_owner(ctx), rest)

    def _exp_base(self, ctx: Ctx) -> str:
        expt = ctx.experiment
        assert expt is not None
        if ctx.via_subject and ctx.project and ctx.subject:
            return (
                f"/data/projects/{ctx.project['id']}/subjects/{ctx.subject['id']}"
                f"/experiments/{expt['id']}"
            )
        return f"/data/experiments/{expt['id']}"

    def _experiment_owner(self, ctx: Ctx) -> Owner:
        expt = ctx.experiment
        assert expt is not None
        return Owner(
            "experiment",
            expt["id"],
            self._exp_base(ctx),
            expt["label"],
            cat_id=expt["id"],
            archive_name=expt["label"],
        )

    def _experiment_item(self, req: Request, expt: dict[str, Any]) -> Reply:
        fields = {
            "ID": expt["id"],
            "label": expt["label"],
            "project": expt["project"],
            "subject_ID": expt["subject_id"],
            "date": expt["date"],
            "modality": _modality(expt["xsi_type"]),
        }
        scans = [self._scan_child(expt, s) for s in self.store.scans(expt["id"])]
        children = [{"field": "scans/scan", "items": scans}] if scans else []
        return self._item(req, expt["xsi_type"], fields, children)

    # -- scans ---------------------------------------------------------------------------
    def _scan_fields(self, expt: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ID": scan["scan_id"],
            "type": scan["type"],
            "series_description": scan["series_description"],
            "quality": scan["quality"],
            "image_session_ID": expt["id"],
            "xnat_imagescandata_id": scan["pk"],
            "project": expt["project"],
        }
        if scan["note"]:
            fields["note"] = scan["note"]
        if scan["frames"]:
            fields["frames"] = int(scan["frames"]) if scan["frames"].isdigit() else scan["frames"]
        return fields

    def _scan_child(self, expt: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
        files = []
        for res in self.store.resources("scan", str(scan["pk"])):
            count, size = self.store.resource_stats(res["id"])
            files.append(
                {
                    "meta": {"isHistory": False, "xsi:type": "xnat:resourceCatalog"},
                    "data_fields": {
                        "label": res["label"],
                        "format": res["format"],
                        "content": res["content"],
                        "file_count": count,
                        "file_size": size,
                        "xnat_abstractresource_id": res["id"],
                        "URI": f"/data/experiments/{expt['id']}/scans/{scan['scan_id']}"
                        f"/resources/{res['id']}",
                    },
                    "children": [],
                }
            )
        return {
            "meta": {"isHistory": False, "xsi:type": scan["xsi_type"]},
            "data_fields": self._scan_fields(expt, scan),
            "children": [{"field": "file", "items": files}] if files else [],
        }

    def _match_scans(self, expt: dict[str, Any], spec: str) -> list[dict[str, Any]]:
        scans = self.store.scans(expt["id"])
        if spec in ("*", "ALL"):
            return scans
        wanted = [w.replace("[SLASH]", "/").replace("[COMMA]", ",") for w in spec.split(",")]
        out = []
        for scan in scans:
            for w in wanted:
                if scan["scan_id"] == w or scan["type"] == w or (w == "NULL" and not scan["type"]):
                    out.append(scan)
                    break
        return out

    def _scan_owner(self, ctx: Ctx, scan: dict[str, Any]) -> Owner:
        expt = ctx.experiment
        assert expt is not None
        sid = scan["scan_id"]
        folder = f"{sid}-{re.sub(r'[^A-Za-z0-9_]', '_', scan['type'])}" if scan["type"] else sid
        return Owner(
            "scan",
            str(scan["pk"]),
            f"{self._exp_base(ctx)}/scans/{sid}",
            f"{expt['label']}/scans/{folder}",
            category="scans",
            cat_id=sid,
            cat_desc=scan["type"],
            archive_name=expt["label"],
        )

    def _scans(self, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
        expt = ctx.experiment
        assert expt is not None
        if not rest:
            if req.method != "GET":
                raise HttpError(405, "Method Not Allowed")
            rows = []
            for s in self.store.scans(expt["id"]):
                rows.append(
                    {
                        "xnat_imagescandata_id": s["pk"],
                        "ID": s["scan_id"],
                        "type": s["type"],
                        "quality": s["quality"],
                        "xsiType": s["xsi_type"],
                        "note": s["note"],
                        "series_description": s["series_description"],
                        "frames": s["frames"],
                        "URI": f"/data/experiments/{expt['id']}/scans/{s['scan_id']}",
                    }
                )
            # ScanList overwrites the query's WHERE clause with the session id, so XNAT ignores
            # filters here; applying them would let clients pass here and fail on a real XNAT.
            return self._table(req, rows, SCAN_COLUMNS, total_meta=True, filters=False)
        spec, tail = rest[0], rest[1:]
        if not tail and req.method in ("PUT", "POST"):
            return self._put_scan(req, expt, spec)
        scans = self._match_scans(expt, spec)
        if not scans:
            raise not_found(f"Unable to find scan {spec}")
        if not tail:
            if req.method == "DELETE":
                for scan in scans:
                    self.store.delete_owner("scan", str(scan["pk"]))
                return Reply()
            return self._item(
                req,
                scans[0]["xsi_type"],
                self._scan_fields(expt, scans[0]),
                self._scan_child(expt, scans[0])["children"],
            )
        owners = [self._scan_owner(ctx, s) for s in scans]
        return self._owner_tail(req, owners, tail)

    def _put_scan(self, req: Request, expt: dict[str, Any], sid: str) -> Reply:
        existing = self.store.scan(expt["id"], sid)
        xsi = req.query.get("xsiType") or (existing["xsi_type"] if existing else "")
        if xsi == "xnat:imageScanData" or (not xsi and existing is None):
            raise HttpError(400, "Please retry with the specification of a particular modality")
        if existing is not None and xsi != existing["xsi_type"]:
            raise HttpError(409, "Cannot change the type of an existing scan.")
        fields = {}
        for name in ("type", "series_description", "quality", "note", "frames"):
            value = _qs(req, xsi, name)
            if value is not None:
                fields[name] = value
        self.store.put_scan(expt["id"], sid, xsi, **fields)
        return Reply()

    # -- assessors -----------------------------------------------------------------------
    def _assessors(self, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
        expt = ctx.experiment
        assert expt is not None
        if not rest:
            rows = [
                {
                    "ID": a["id"],
                    "label": a["label"],
                    "xsiType": a["xsi_type"],
                    "project": a["project"],
                    "insert_date": a["insert_date"],
                    "session_ID": expt["id"],
                    "session_label": expt["label"],
                    "URI": f"/data/experiments/{expt['id']}/assessors/{a['id']}",
                }
                for a in self.store.assessors(expt["id"])
            ]
            return self._table(
                req, rows, ["ID", "label", "xsiType", "project", "insert_date", "URI"]
            )
        ident, tail = rest[0], rest[1:]
        found = self.store.assessor(expt["id"], ident)
        if not tail and req.method in ("PUT", "POST"):
            if found is not None:
                return Reply(200, found["id"].encode())
            xsi = req.query.get("xsiType", "")
            if not xsi:
                raise HttpError(417, "Need PUT Contents")
            if not VALID_LABEL.match(ident):
                raise HttpError(417, "Invalid character in assessor label.")
            created = self.store.create_assessor(expt, ident, xsi, req.user or "")
            return Reply(201, created["id"].encode())
        if found is None:
            raise not_found(f"Unable to find assessor {ident}")
        if not tail:
            if req.method == "DELETE":
                self.store.delete_owner("assessor", found["id"])
                return Reply()
            fields = {
                "ID": found["id"],
                "label": found["label"],
                "project": found["project"],
                "imageSession_ID": expt["id"],
            }
            return self._item(req, found["xsi_type"], fields, [])
        inout = "out"
        if tail[0] in ("in", "out"):
            inout, tail = tail[0], tail[1:]
        if not tail:
            raise not_found("The server has not found anything matching the request URI")
        owner = Owner(
            "assessor",
            found["id"],
            f"{self._exp_base(ctx)}/assessors/{found['id']}/{inout}",
            f"{expt['label']}/assessors/{found['label']}/{inout}",
            category="assessors",
            cat_id=found["id"],
            inout=inout,
            archive_name=expt["label"],
        )
        return self._owner_tail(req, owner, tail)

    # -- resources and files -------------------------------------------------------------
    def _owner_tail(self, req: Request, owners: Owner | list[Owner], rest: list[str]) -> Reply:
        owners = owners if isinstance(owners, list) else [owners]
        what = rest[0]
        if what == "resources":
            if len(rest) == 1:
                return self._resource_list(req, owners)
            return self._resource(req, owners, rest[1], rest[2:])
        if what == "files":
            return self._files(req, owners, None, "/".join(rest[1:]))
        raise not_found("The server has not found anything matching the request URI")

    def _resources_of(self, owner: Owner) -> list[dict[str, Any]]:
        return self.store.resources(owner.kind, owner.id, owner.inout)

    def _resource_list(self, req: Request, owners: list[Owner]) -> Reply:
        if req.method != "GET":
            raise HttpError(405, "Method Not Allowed")
        rows = []
        for owner in owners:
            for res in self._resources_of(owner):
                count, size = self.store.resource_stats(res["id"])
                rows.append(
                    {
                        "xnat_abstractresource_id": res["id"],
                        "label": res["label"],
                        "element_name": "xnat:resourceCatalog",
                        "category": owner.category,
                        "cat_id": owner.cat_id,
                        "cat_desc": owner.cat_desc,
                        "file_count": count,
                        "file_size": size,
                        "tags": res["tags"],
                        "content": res["content"],
                        "format": res["format"],
                    }
                )
        return self._table(req, rows, RESOURCE_COLUMNS, meta={"title": "Resources"}, fixed=True)

    def _find_resources(self, owners: list[Owner], spec: str) -> list[tuple[Owner, dict[str, Any]]]:
        found = []
        for owner in owners:
            for res in self._resources_of(owner):
                for want in spec.split(","):
                    if (want.isdigit() and int(want) == res["id"]) or want == res["label"]:
                        found.append((owner, res))
                        break
        return found

    def _resource(self, req: Request, owners: list[Owner], spec: str, rest: list[str]) -> Reply:
        found = self._find_resources(owners, spec)
        if not rest:
            if req.method in ("PUT", "POST"):
                if found:
                    raise HttpError(409, "Specified resource already exists.")
                self._create_resource(req, owners[0], spec)
                return Reply()
            if not found:
                raise not_found("Unable to find the specified catalog.")
            if req.method == "DELETE":
                for _, res in found:
                    self.store.delete_resource(res["id"])
                return Reply()
            return self._catalog_xml(found[0][1])
        if rest[0] != "files":
            raise not_found("The server has not found anything matching the request URI")
        path = "/".join(rest[1:])
        if req.method in ("PUT", "POST"):
            if found:
                res = found[0][1]
            elif spec.isdigit():
                raise not_found("Unable to find the specified catalog.")
            else:
                res = self._create_resource(req, owners[0], spec)
                try:
                    return self._upload(req, res, path)
                except BaseException:
                    # The resource exists only for this upload; a refused upload takes it back.
                    self.store.delete_resource(res["id"])
                    raise
            return self._upload(req, res, path)
        if not found:
            raise not_found("Unable to find the specified catalog.")
        return self._files(req, owners, found, path)

    def _create_resource(self, req: Request, owner: Owner, label: str) -> dict[str, Any]:
        if not label or label.isdigit():
            raise HttpError(400, "Resource labels made only of digits cannot be addressed.")
        return self.store.create_resource(
            owner.kind,
            owner.id,
            label,
            owner.inout,
            **{
                k: req.query[k]
                for k in ("format", "content", "tags", "description")
                if k in req.query
            },
        )

    def _catalog_xml(self, res: dict[str, Any]) -> Reply:
        entries = "".join(
            f'<cat:entry URI="{_xml(f.path)}" ID="{_xml(f.path)}" digest="{f.digest}"'
            f' format="{_xml(f.format)}" content="{_xml(f.content)}"/>\n'
            for f in self.store.files(res["id"])
        )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog '
            'xmlns:cat="http://nrg.wustl.edu/catalog" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'ID="{res["id"]}" label="{_xml(res["label"])}" format="{_xml(res["format"])}" '
            f'content="{_xml(res["content"])}">\n<cat:entries>\n{entries}</cat:entries>\n'
            "</cat:Catalog>\n"
        )
        return Reply(200, body.encode(), "text/xml")

    def _select_files(
        self, pairs: list[tuple[Owner, dict[str, Any]]], path: str
    ) -> tuple[list[tuple[Owner, dict[str, Any], StoredFile]], bool]:
        """Files addressed by ``path`` (exact file, folder/, folder or prefix*); and whether the
        path named one file exactly."""
        selected = []
        exact = False
        for owner, res in pairs:
            for f in self.store.files(res["id"]):
                if not path or _path_matches(f.path, path):
                    selected.append((owner, res, f))
                    exact = exact or (f.path == path)
        return selected, exact and len(selected) == 1

    def _files(
        self,
        req: Request,
        owners: list[Owner],
        found: list[tuple[Owner, dict[str, Any]]] | None,
        path: str,
    ) -> Reply:
        pairs = (
            found if found is not None else [(o, r) for o in owners for r in self._resources_of(o)]
        )
        if req.method in ("PUT", "POST"):
            if not pairs:
                raise not_found("Unable to find the specified catalog.")
            return self._upload(req, pairs[0][1], path)
        selected, exact = self._select_files(pairs, path)
        if req.method == "DELETE":
            if not selected:
                return self._missing(req, "No matched files")
            for res_id in {r["id"] for _, r, _ in selected}:
                self.store.delete_files(
                    res_id, [f.path for _, r, f in selected if r["id"] == res_id]
                )
            return Reply()
        if exact and "format" not in req.query:
            return self._send_file(req, selected[0][2])
        if path and not selected:
            return self._missing(req, "Unable to find file.")
        fmt = req.query.get("format", "json").lower()
        if fmt == "zip":
            return self._zip(req, selected, owners)
        if fmt in ("tar", "tar.gz"):
            raise HttpError(406, f"The sandbox serves zip downloads only, not {fmt}.")
        rows = []
        for owner, res, f in selected:
            rows.append(
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
            )
        for key, column in (("file_format", "file_format"), ("file_content", "file_content")):
            if key in req.query:
                want = "" if req.query[key] == "NULL" else req.query[key]
                rows = [r for r in rows if r[column] == want]
        return self._table(
            req,
            rows,
            FILE_COLUMNS,
            meta={"title": "Files"},
            columns_meta=[{"key": "URI", "serverRoot": ""}],
            total_meta=False,
            fixed=True,
        )

    def _missing(self, req: Request, reason: str) -> Reply:
        if req.flag("accept-not-found"):
            return Reply(204)
        raise not_found(reason)

    def _send_file(self, req: Request, f: StoredFile) -> Reply:
        suffix = Path(f.path).suffix.lower()
        ctype = CONTENT_TYPES.get(suffix, "application/octet-stream")
        headers = {
            "Last-Modified": formatdate(f.mtime, usegmt=True),
            "Cache-Control": "must-revalidate",
        }
        if ctype.startswith("application/") or ctype == "text/html":
            headers["Content-Disposition"] = f'attachment; filename="{f.name}";'
        return Reply(
            200,
            content_type=ctype,
            headers=headers,
            file=self.store.file_path(f.resource_id, f.path),
        )

    def _zip(
        self,
        req: Request,
        selected: list[tuple[Owner, dict[str, Any], StoredFile]],
        owners: list[Owner],
    ) -> Reply:
        if not selected:
            return self._missing(req, "No matching files found.")
        structure = req.query.get("structure", "default")
        prefix = ""
        ctx_expt = [o for o in owners if o.kind in ("scan", "experiment", "assessor")]
        if ctx_expt and req.flag("projectIncludedInPath"):
            prefix += self._project_of(owners[0]) + "/"
        entries = [
            ZipEntry(
                prefix + _zip_path(owner, res, f, structure),
                self.store.file_path(res["id"], f.path),
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

    def _project_of(self, owner: Owner) -> str:
        return (
            owner.base_uri.split("/")[3]
            if owner.base_uri.startswith("/data/projects/")
            else (owner.zip_prefix.split("/")[0])
        )

    # -- uploads -------------------------------------------------------------------------
    def _upload(self, req: Request, res: dict[str, Any], path: str) -> Reply:
        ctype = req.headers.get("Content-Type", "")
        inbody = req.flag("inbody")
        overwrite = req.flag("overwrite")
        extract = req.flag("extract")
        attrs = {k: req.query.get(k, "") for k in ("format", "content", "tags")}
        uploads: list[tuple[str, tuple[Path, int, str]]] = []
        try:
            if ctype.lower().startswith("multipart/form-data"):
                if inbody:
                    raise HttpError(406, "Multipart uploads cannot be combined with inbody=true.")
                uploads = self._multipart(req, ctype, path)
            else:
                if not inbody and not ctype.lower().startswith(RAW_UPLOAD_TYPES):
                    raise HttpError(
                        400,
                        "Unable to identify upload format: send inbody=true or a"
                        " multipart/form-data body.",
                    )
                if not path:
                    raise HttpError(400, "A raw upload needs the file path in the URL.")
                spooled = self.store.spool(req.body.chunks())
                uploads = [(path, spooled)]
            if not uploads or all(size == 0 for _, (_, size, _) in uploads):
                raise HttpError(
                    400,
                    "You tried to PUT to this service, but didn't provide any"
                    " data (found 0 bytes). Please include the data.",
                )
            duplicates: list[str] = []
            for name, spooled in uploads:
                if extract and name.lower().endswith(ARCHIVE_SUFFIXES):
                    duplicates += self._extract(res["id"], spooled[0], name, overwrite, attrs)
                    continue
                try:
                    stored = self.store.add_file(
                        res["id"], name, spooled, overwrite=overwrite, **attrs
                    )
                except PathRefused:
                    raise HttpError(400, f"Invalid file path {name!r}.") from None
                if not stored:
                    duplicates.append(safe_relpath(name))
        except BodyError as exc:
            raise HttpError(400, str(exc)) from None
        finally:
            for _, (tmp, _, _) in uploads:
                tmp.unlink(missing_ok=True)
        if duplicates:
            return Reply(200, json.dumps({"duplicates": duplicates}).encode(), "text/html")
        return Reply(200)

    def _multipart(
        self, req: Request, ctype: str, path: str
    ) -> list[tuple[str, tuple[Path, int, str]]]:
        match = re.search(r'boundary="?([^";]+)"?', ctype)
        if not match:
            raise HttpError(400, "multipart/form-data body without a boundary")
        uploads: list[tuple[str, tuple[Path, int, str]]] = []
        try:
            for part, chunks in iter_multipart(req.body.read, match.group(1).encode()):
                if not part.filename:
                    value = b"".join(chunks).decode("utf-8", "replace")
                    if part.name and part.name not in req.query:
                        req.query[part.name] = value
                    continue
                # With a path in the URL the stored name is that path, as FileList does.
                name = path if path and not uploads else part.filename
                uploads.append((name, self.store.spool(chunks)))
        except BaseException:
            for _, (tmp, _, _) in uploads:
                tmp.unlink(missing_ok=True)
            raise
        return uploads

    def _extract(
        self, rid: int, archive: Path, name: str, overwrite: bool, attrs: dict[str, str]
    ) -> list[str]:
        """Unpack an uploaded archive into the resource root; returns the kept duplicates."""
        duplicates = []
        # Spool every entry before storing any, so a refused entry (``..``, a link, a broken
        # archive) leaves the resource as it was instead of half-extracted.
        spooled: list[tuple[str, tuple[Path, int, str]]] = []
        try:
            for member, stream in _archive_members(archive, name):
                try:
                    rel = safe_relpath(member)
                except PathRefused:
                    raise HttpError(
                        400, f"Archive entry {member!r} escapes the resource."
                    ) from None
                with stream as fh:
                    spooled.append((rel, self.store.spool(fh)))
            for rel, entry in spooled:
                if not self.store.add_file(rid, rel, entry, overwrite=overwrite, **attrs):
                    duplicates.append(rel)
        finally:
            for _, (tmp, _, _) in spooled:
                tmp.unlink(missing_ok=True)
        return duplicates

    # -- shared representations ----------------------------------------------------------
    def _table(
        self,
        req: Request,
        rows: list[dict[str, Any]],
        defaults: list[str],
        *,
        meta: dict[str, str] | None = None,
        columns_meta: list[dict[str, str]] | None = None,
        total_meta: bool = True,
        available: list[str] | None = None,
        fixed: bool = False,
        filters: bool = True,
    ) -> Reply:
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, "Method Not Allowed")
        query = req.query
        if not filters:
            query = {k: v for k, v in query.items() if k in CONTROL_PARAMS}
        if fixed:
            # Resource and file listings build their own fixed columns (CatalogUtils) and
            # ignore columns=, unlike the query-organizer listings above them.
            query = {k: v for k, v in query.items() if k != "columns"}
        body, ctype = render_table(
            rows,
            defaults=defaults,
            query=query,
            meta=meta,
            columns_meta=columns_meta,
            total_meta=total_meta,
            available=available,
        )
        return Reply(200, body, ctype)

    def _item(
        self, req: Request, xsi: str, fields: dict[str, Any], children: list[dict[str, Any]]
    ) -> Reply:
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, "Method Not Allowed")
        fmt = req.query.get("format", "html").lower()
        if fmt == "json":
            item = {
                "meta": {
                    "isHistory": False,
                    "xsi:type": xsi,
                    "start_date": time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime()),
                },
                "data_fields": fields,
                "children": children,
            }
            return Reply.json({"items": [item]})
        if fmt == "xml":
            return Reply(200, _item_xml(xsi, fields).encode(), "text/xml")
        rows = "".join(
            f"<tr><th>{_xml(k)}</th><td>{_xml(str(v))}</td></tr>" for k, v in fields.items()
        )
        return Reply(
            200,
            f"<html><body><h2>{_xml(xsi)}</h2><table>{rows}</table></body></html>".encode(),
            "text/html",
        )


def _qs(req: Request, xsi: str, name: str) -> str | None:
    """A field given as shortcut (``type=``) or xpath (``xnat:mrScanData/type=``)."""
    if name in req.query:
        return req.query[name]
    lowered = name.lower()
    for key, value in req.query.items():
        if "/" in key and key.rsplit("/", 1)[1].lower() == lowered:
            return value
    return None


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


def _archive_members(archive: Path, name: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(entry name, open entry) for each regular file of a zip or tar; links are refused."""
    lowered = name.lower()
    try:
        if lowered.endswith(".zip"):
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


def _xml(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _item_xml(xsi: str, fields: dict[str, Any]) -> str:
    prefix, _, name = xsi.partition(":")
    tag = name[:-4] if name.endswith("Data") else name
    for short in ("mr", "ct", "pet", "qc"):
        if tag.startswith(short):
            tag = short.upper() + tag[len(short) :]
    tag = f"{prefix}:{tag[0].upper()}{tag[1:]}"
    attrs = " ".join(f'{k}="{_xml(str(v))}"' for k, v in fields.items())
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} {attrs} '
        f'xmlns:{prefix}="http://nrg.wustl.edu/{prefix}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>\n'
    )
