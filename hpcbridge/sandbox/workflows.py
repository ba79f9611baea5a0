"""XNAT's workflow entries (``/data/workflows``): what pipelines report their progress in.
Entries are keyed by (id, scan_id, pipeline_name, launch_time); other fields are kept as given.
"""

from __future__ import annotations

import json
from typing import Any

from .http import HttpError, Reply, Request
from .views import Site, cells, child_item

#: The workflow columns of the store; any other ``wrk:workflowData/`` field goes to ``fields``.
COLUMNS = ("id", "data_type", "pipeline_name", "launch_time", "status", "scan_id")


def route(site: Site, req: Request, segs: list[str]) -> Reply:
    given = _fields(req.query)
    if segs:
        try:
            found = site.store.workflows(wrk_id=int(segs[0]))
        except ValueError:
            found = []
        if not found:
            raise HttpError(404, "Unable to find the specified workflow.")
        if req.method in ("PUT", "POST"):
            return _save(site, req, found[0], given)
        return Reply.json({"items": [_item(found[0])]})
    if req.method in ("PUT", "POST"):
        return _put(site, req, given)
    if req.method != "GET":
        raise HttpError(405, "Method Not Allowed")
    match = {k: v for k, v in given.items() if k in COLUMNS}
    return Reply.json({"items": [_item(w) for w in site.store.workflows(**match)]})


def _put(site: Site, req: Request, given: dict[str, str]) -> Reply:
    """Update the entry with the given key, or create one when all its fields are given."""
    key = {k: given.get(k, "") for k in ("id", "scan_id", "pipeline_name", "launch_time")}
    found = []
    if all(key[k] for k in ("id", "pipeline_name", "launch_time")):
        found = site.store.workflows(**key)
    if not found and not all(
        given.get(k) for k in ("id", "launch_time", "data_type", "pipeline_name")
    ):
        raise HttpError(
            400,
            "Id, launch_time, data_type and pipeline_name are all required"
            " to create a new workflow entry.",
        )
    return _save(site, req, found[0] if found else None, given)


def _save(site: Site, req: Request, row: dict[str, Any] | None, given: dict[str, str]) -> Reply:
    if row is not None and row["create_user"] != req.user and not site.auth.is_admin(req.user):
        raise HttpError(403, "You are not allowed to make changes to this workflow.")
    merged: dict[str, Any] = dict(row or {"create_user": req.user, "scan_id": ""})
    extra = json.loads(merged.get("fields") or "{}")
    for key, value in given.items():
        if key in COLUMNS:
            merged[key] = value
        else:
            extra[key] = value
    merged["fields"] = json.dumps(extra)
    site.store.save_workflow(merged)
    return Reply()


def _fields(query: dict[str, str]) -> dict[str, str]:
    out = {}
    for key, value in query.items():
        if key.lower().startswith("wrk:workflowdata/"):
            name = key.split("/", 1)[1]
            out[name.lower() if name.lower() in COLUMNS else name] = value
    return out


def _item(row: dict[str, Any]) -> dict[str, Any]:
    spec = "ID=id data_type pipeline_name launch_time status wrk_workflowData_id=wrk_id create_user"
    fields = cells(row, spec)
    if row["scan_id"]:
        fields["scan_id"] = row["scan_id"]
    fields.update(json.loads(row["fields"] or "{}"))
    return child_item("wrk:workflowData", fields)
