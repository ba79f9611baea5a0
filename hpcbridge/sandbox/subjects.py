"""The subject level of the archive: by label within a project or by accession ID; a PUT of an
experiment below a missing subject creates both, as XNAT does.
"""

from __future__ import annotations

from typing import Any

from . import experiments, resources
from .http import HttpError, Reply, Request
from .store import VALID_LABEL
from .views import Ctx, Owner, Site, cells, item, not_found, only_get, qs, table


def listing(site: Site, req: Request, proj: dict[str, Any] | None) -> Reply:
    only_get(req)
    spec = "ID=id project label insert_date insert_user URI gender"
    rows = [
        cells(s, spec, URI=f"/data/subjects/{s['id']}")
        for s in site.store.subjects(proj["id"] if proj else None)
    ]
    return table(req, rows, "ID project label insert_date insert_user URI".split())


def put_or_get(site: Site, req: Request, ctx: Ctx, ident: str, rest: list[str]) -> Reply:
    assert ctx.project is not None
    subj = site.store.subject(ident, ctx.project["id"])
    if not rest and req.method in ("PUT", "POST"):
        if subj is not None:
            return Reply(200, subj["id"].encode())
        if not VALID_LABEL.match(ident):
            raise HttpError(417, "Invalid character in subject label.")
        gender = qs(req, "xnat:subjectData", "gender") or ""
        subj = site.store.create_subject(ctx.project["id"], ident, req.user or "", gender)
        return Reply(201, subj["id"].encode())
    if subj is None:
        if req.method in ("PUT", "POST") and len(rest) == 2 and rest[0] == "experiments":
            # SubjAssessmentResource.handlePut creates a missing subject (label from the
            # URL) together with the experiment, once the experiment itself is valid.
            ctx.via_subject = True
            ctx.extra["new_subject"] = ident
            return experiments.put_or_get(site, req, ctx, rest[1], [])
        raise not_found(f"Unable to identify subject {ident}")
    ctx.subject = subj
    return subject(site, req, ctx, rest)


def subject(site: Site, req: Request, ctx: Ctx, rest: list[str]) -> Reply:
    subj, proj = ctx.subject, ctx.project
    assert subj is not None and proj is not None
    if not rest:
        if req.method == "DELETE":
            site.store.delete_owner("subject", subj["id"])
            return Reply()
        fields = cells(subj, "ID=id label project")
        if subj["gender"]:
            fields["gender"] = subj["gender"]
        return item(req, "xnat:subjectData", fields, [])
    if rest[0] == "experiments":
        ctx.via_subject = True
        return experiments.route(site, req, ctx, rest[1:])
    uri = f"/data/projects/{proj['id']}/subjects/{subj['id']}"
    owner = Owner("subject", subj["id"], uri, subj["label"], archive_name=subj["label"])
    return resources.owner_tail(site, req, owner, rest)
