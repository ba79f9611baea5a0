"""The project level of the archive: ``/data/projects`` and ``/data/projects/{id}``, by ID or
alias; subjects, experiments and resources below a project are handed to their levels.
"""

from __future__ import annotations

from typing import Any

from . import experiments, resources, subjects
from .http import HttpError, Reply, Request
from .store import VALID_LABEL
from .views import Ctx, Owner, Site, cells, item, not_found, only_get, qs_fields, table

PROJECT_COLUMNS = "ID secondary_ID name description pi_firstname pi_lastname URI".split()
FIELDS = "ID=id secondary_ID=secondary_id name description"


def route(site: Site, req: Request, segs: list[str]) -> Reply:
    if not segs:
        only_get(req)
        return table(req, [_row(p) for p in site.store.projects()], PROJECT_COLUMNS)
    pid, rest = segs[0], segs[1:]
    proj = site.store.project(pid)
    if not rest:
        return _project(site, req, pid, proj)
    if proj is None:
        raise not_found(f"Unable to identify project {pid}")
    ctx = Ctx(project=proj)
    if rest[0] == "subjects":
        if len(rest) == 1:
            return subjects.listing(site, req, proj)
        return subjects.put_or_get(site, req, ctx, rest[1], rest[2:])
    if rest[0] == "experiments":
        return experiments.route(site, req, ctx, rest[1:])
    uri = f"/data/projects/{proj['id']}"
    owner = Owner("project", proj["id"], uri, proj["id"], archive_name=proj["id"])
    return resources.owner_tail(site, req, owner, rest)


def _row(p: dict[str, Any]) -> dict[str, Any]:
    spec = f"{FIELDS} pi_firstname pi_lastname URI insert_date insert_user"
    return cells(p, spec, URI=f"/data/projects/{p['id']}")


def _project(site: Site, req: Request, pid: str, proj: dict[str, Any] | None) -> Reply:
    if req.method in ("PUT", "POST"):
        return _put(site, req, pid, proj)
    if proj is None:
        raise not_found(f"Unable to identify project {pid}")
    if req.method == "DELETE":
        site.store.delete_owner("project", proj["id"])
        return Reply()
    return item(req, "xnat:projectData", cells(proj, FIELDS), [])


def _put(site: Site, req: Request, pid: str, proj: dict[str, Any] | None) -> Reply:
    if not site.auth.is_admin(req.user):
        raise HttpError(
            403, "Specified user account has insufficient create privileges for projects."
        )
    if not VALID_LABEL.match(pid):
        raise HttpError(417, "Invalid character in project ID.")
    if proj is None:
        names = ("name", "secondary_ID", "description", "pi_firstname", "pi_lastname")
        given = qs_fields(req, "xnat:projectData", names)
        fields = {"name": pid, "secondary_id": pid} | {k.lower(): v for k, v in given.items()}
        site.store.create_project(pid, req.user or "", **fields)
    return Reply()
