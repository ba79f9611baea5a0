"""Browsing: what lies at an address, in as few requests as XNAT allows.

Every function takes an open ``XnatClient`` (one server session for all of them) and returns
typed models whose ``raw`` keeps XNAT's own keys for ``--json``. A missing level is reported by
the address that was missing (``no subject 'X' in project P``), not by a URL.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import AddressError, Step, XnatNotFoundError, XnatServerError
from .address import Address
from .client import XnatClient
from .model import Experiment, FileEntry, Project, Resource, Scan, ScanRef, Subject

log = logging.getLogger(__name__)

# One row per session and scan for a whole project (xnat-api.md section 2.3, as DAX uses it).
PROJECT_SCAN_COLUMNS = (
    "ID,label,project,subject_label,xnat:imagescandata/id,xnat:imagescandata/type,"
    "xnat:imagescandata/series_description,xnat:imagescandata/quality"
)
_SCAN_KEY = "xnat:imagescandata/id"


@dataclass(frozen=True)
class Listing:
    kind: str  # projects, subjects, experiments, scans, resources, project-scans
    items: list[Any] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """XNAT's own keys (numbers as numbers), for --json."""
        out = []
        for item in self.items:
            if isinstance(item, ScanRef):
                out.append(item.as_dict())
                continue
            row = dict(item.raw)
            if isinstance(item, Scan):
                row.update(file_count=item.file_count, file_size=item.file_size)
            if isinstance(item, Resource):
                row["files"] = [dict(f.raw) for f in item.files]
            out.append(row)
        return out


def _session_path(a: Address) -> str:
    return f"/data/projects/{a.project}/subjects/{a.subject}/experiments/{a.experiment}"


def projects(client: XnatClient) -> list[Project]:
    return [Project.from_row(r) for r in client.listing("/data/projects", "the project list")]


def subjects(client: XnatClient, project: str) -> list[Subject]:
    rows = client.listing(f"/data/projects/{project}/subjects", f"subjects of {project}")
    return [Subject.from_row(r) for r in rows]


def experiments(client: XnatClient, project: str, subject: str | None = None) -> list[Experiment]:
    where = f"/data/projects/{project}" + (f"/subjects/{subject}" if subject else "")
    rows = client.listing(f"{where}/experiments", f"experiments of {project}")
    return [Experiment.from_row(r) for r in rows]


def experiment(
    client: XnatClient, ident: str, project: str | None = None, subject: str | None = None
) -> Experiment:
    """One experiment by label (within ``project``, and ``subject`` if given) or by accession
    ID (``XNAT_E00001``)."""
    path, where = f"/data/experiments/{ident}", ident
    if project:
        where = "/".join(p for p in (project, subject, ident) if p)
        path = f"/data/projects/{project}" + (f"/subjects/{subject}" if subject else "")
        path += f"/experiments/{ident}"
    known = client.memo.get(f"experiment {path}")
    if isinstance(known, Experiment):
        return known
    try:
        data = client.get_json(path, f"experiment {where}")
        item = data["items"][0]
        fields, xsi = item["data_fields"], item.get("meta", {}).get("xsi:type", "")
    except XnatNotFoundError:
        raise XnatNotFoundError(f"not found: experiment {where}", status=404) from None
    except (KeyError, IndexError, TypeError):
        raise XnatServerError(f"XNAT's answer for experiment {where} has no item") from None
    row = {
        "ID": fields.get("ID", ""),
        "label": fields.get("label", ""),
        "project": fields.get("project", ""),
        "xsiType": xsi,
        "date": fields.get("date", ""),
        "subject_ID": fields.get("subject_ID", ""),
    }
    found = Experiment.from_row(row)
    client.memo[f"experiment {path}"] = found
    return found


def scans_of(client: XnatClient, address: Address) -> tuple[str, str, list[Scan]]:
    """(experiment ID, experiment label, scans) of the experiment at ``address``: two requests."""
    try:
        expt = experiment(
            client, address.experiment or "", project=address.project, subject=address.subject
        )
        rows = client.listing(f"/data/experiments/{expt.id}/scans", f"scans of {address}")
    except XnatNotFoundError:
        require(client, Address(address.project, address.subject, address.experiment))
        raise
    return expt.id, expt.label, [Scan.from_row(r, expt.id) for r in rows]


def scans(client: XnatClient, address: Address) -> list[Scan]:
    """The scans of a session with their file counts: two requests, whatever the scan count."""
    base = _session_path(address)
    rows = client.listing(f"{base}/scans", f"scans of {address}")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if rows:
        # scans/ALL names every scan at once, so one listing covers all their resources.
        for res in client.listing(f"{base}/scans/ALL/resources", f"resources of {address}"):
            total = totals[str(res.get("cat_id", ""))]
            total[0] += res.get("file_count") or 0
            total[1] += res.get("file_size") or 0
    out = []
    for row in rows:
        count, size = totals[str(row["ID"])]
        out.append(Scan.from_row(dict(row, file_count=count, file_size=size)))
    return out


def resources(client: XnatClient, address: Address) -> list[Resource]:
    """The resources of one scan, each with its files: two requests."""
    base = f"{_session_path(address)}/scans/{address.scan}"
    rows = client.listing(f"{base}/resources", f"resources of {address}")
    files = (
        [FileEntry.from_row(r) for r in client.listing(f"{base}/files", f"files of {address}")]
        if rows
        else []
    )
    out = []
    for row in rows:
        rid = int(row.get("xnat_abstractresource_id") or 0)
        out.append(Resource.from_row(row, tuple(f for f in files if f.resource_id == rid)))
    return out


def project_scans(
    client: XnatClient, project: str, xsi_type: str = "xnat:imageSessionData"
) -> list[ScanRef]:
    """Every scan of every image session of a project, in one request when XNAT can.

    Falls back to one scan listing per session (same server session) if the server ignores
    the scan columns.
    """
    rows = client.listing(
        "/data/experiments",
        f"scans of project {project}",
        {"project": project, "xsiType": xsi_type, "columns": PROJECT_SCAN_COLUMNS},
    )
    if not rows:
        require(client, Address(project))
        return []
    if all(_SCAN_KEY in r for r in rows):
        return [
            ScanRef(
                r.get("project") or project,
                r.get("subject_label", ""),
                r["ID"],
                r.get("label", ""),
                str(r[_SCAN_KEY]),
                r.get("xnat:imagescandata/type", ""),
                r.get("xnat:imagescandata/series_description", ""),
                r.get("xnat:imagescandata/quality", ""),
            )
            for r in rows
            if r.get(_SCAN_KEY) not in (None, "")
        ]
    log.info("XNAT ignored the scan columns; listing scans session by session")
    out = []
    for expt in {r["ID"]: r for r in rows}.values():
        for s in client.listing(f"/data/experiments/{expt['ID']}/scans", f"scans of {expt['ID']}"):
            out.append(
                ScanRef(
                    project,
                    expt.get("subject_label", ""),
                    expt["ID"],
                    expt.get("label", ""),
                    str(s["ID"]),
                    s.get("type", ""),
                    s.get("series_description", ""),
                    s.get("quality", ""),
                )
            )
    return out


def require(client: XnatClient, address: Address) -> None:
    """Raise a not-found error naming the first level of ``address`` that does not exist."""
    a = address
    checks = [
        (f"/data/projects/{a.project}", f"no project '{a.project}'"),
        (
            f"/data/projects/{a.project}/subjects/{a.subject}",
            f"no subject '{a.subject}' in project {a.project}",
        ),
        (_session_path(a), f"no experiment '{a.experiment}' in {a.project}/{a.subject}"),
        (
            f"{_session_path(a)}/scans/{a.scan}",
            f"no scan '{a.scan}' in {a.project}/{a.subject}/{a.experiment}",
        ),
    ]
    for path, missing in checks[: a.depth]:
        try:
            client.request("GET", path, str(a), params={"format": "json"})
        except XnatNotFoundError:
            raise XnatNotFoundError(
                f"not found: {a} ({missing})",
                step=Step.LS_ABOVE if a.depth > 1 else Step.LS_TOP,
                address=str(a).rsplit("/", 1)[0],
                status=404,
            ) from None


def ls(client: XnatClient, address: Address, *, all_scans: bool = False) -> Listing:
    """What is below ``address``; ``all_scans`` lists every scan of a project at once."""
    try:
        if all_scans:
            if address.depth != 1:
                raise AddressError("--scans lists a whole project: give just PROJECT")
            return Listing("project-scans", project_scans(client, address.project or ""))
        if address.depth == 0:
            return Listing("projects", projects(client))
        if address.depth == 1:
            return Listing("subjects", subjects(client, address.project or ""))
        if address.depth == 2:
            return Listing(
                "experiments", experiments(client, address.project or "", address.subject)
            )
        if address.depth == 3:
            return Listing("scans", scans(client, address))
        return Listing("resources", resources(client, address))
    except XnatNotFoundError:
        require(client, address)
        raise
