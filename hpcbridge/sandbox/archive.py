"""The archive routes of the sandbox: projects down to files, as XNAT 1.8's REST API answers them.

Paths are resolved the way XNAT's Restlet templates do (``/data`` = ``/REST``, with or without
``/archive``; projects by ID or alias; subjects and experiments by label within a project or by
accession ID; scans by ID or type; resources by label or numeric id). One module per level
(``projects``, ``subjects``, ``experiments``, ``scans``, ``resources``, ``files``, ``uploads``)
answers its part; this one is the entry. See docs/sandbox.md for what is implemented and where
the sandbox knowingly differs.
"""

from __future__ import annotations

from . import experiments, projects, subjects
from .http import Reply, Request
from .views import Ctx, Site, not_found


def handle(site: Site, req: Request, segs: list[str]) -> Reply:
    """Answer ``/data/{projects,subjects,experiments}/...`` (``segs`` after ``/data``)."""
    head = segs[0]
    if head == "projects":
        return projects.route(site, req, segs[1:])
    if head == "subjects":
        if len(segs) == 1:
            return subjects.listing(site, req, None)
        subj = site.store.subject(segs[1])
        if subj is None:
            raise not_found(f"Unable to find the specified subject: {segs[1]}")
        ctx = Ctx(project=site.store.project(subj["project"]), subject=subj)
        return subjects.subject(site, req, ctx, segs[2:])
    if head == "experiments":
        if len(segs) == 1:
            return experiments.listing(site, req, Ctx(), all_experiments=True)
        expt = site.store.experiment(segs[1])
        if expt is None:
            raise not_found("Unable to find the specified experiment.")
        ctx = Ctx(
            project=site.store.project(expt["project"]),
            subject=site.store.subject(expt["subject_id"]),
            experiment=expt,
        )
        return experiments.experiment(site, req, ctx, segs[2:])
    raise not_found()
