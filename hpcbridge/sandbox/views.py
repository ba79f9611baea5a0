"""What every archive level shares: the request context, resource owners, and the table and
item representations XNAT answers with. The levels (``projects`` down to ``files``) import it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .auth import Authority
from .http import HttpError, Reply, Request
from .listing import CONTROL_PARAMS, render_table
from .store import Store

NO_MATCH = "The server has not found anything matching the request URI"


@dataclass(frozen=True)
class Site:
    """The archive and the users every route works with."""

    store: Store
    auth: Authority


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

    def experiment_uri(self) -> str:
        """The experiment's URI as the request named it (with or without its subject)."""
        expt = self.experiment
        assert expt is not None
        if self.via_subject and self.project and self.subject:
            return (
                f"/data/projects/{self.project['id']}/subjects/{self.subject['id']}"
                f"/experiments/{expt['id']}"
            )
        return f"/data/experiments/{expt['id']}"


def not_found(reason: str = NO_MATCH) -> HttpError:
    return HttpError(404, reason)


def cells(row: dict[str, Any], spec: str, **computed: Any) -> dict[str, Any]:
    """The fields ``spec`` names (``Out=column`` or ``column``, space-separated), in its order,
    from ``row`` or, for names given there, from ``computed``."""
    out = {}
    for name in spec.split():
        key, _, column = name.partition("=")
        out[key] = computed[key] if key in computed else row[column or key]
    return out


def only_get(req: Request) -> None:
    if req.method != "GET":
        raise HttpError(405, "Method Not Allowed")


def table(
    req: Request,
    rows: list[dict[str, Any]],
    defaults: list[str],
    *,
    meta: dict[str, str] | None = None,
    columns_meta: list[dict[str, str]] | None = None,
    total_meta: bool = True,
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
    )
    return Reply(200, body, ctype)


def child_item(
    xsi: str, fields: dict[str, Any], children: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    """One item of XNAT's JSON representation (``items``, and ``children`` below them)."""
    return {
        "meta": {"isHistory": False, "xsi:type": xsi},
        "data_fields": fields,
        "children": list(children),
    }


def item(req: Request, xsi: str, fields: dict[str, Any], children: list[dict[str, Any]]) -> Reply:
    if req.method not in ("GET", "HEAD"):
        raise HttpError(405, "Method Not Allowed")
    fmt = req.query.get("format", "html").lower()
    if fmt == "json":
        one = child_item(xsi, fields, children)
        one["meta"]["start_date"] = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
        return Reply.json({"items": [one]})
    if fmt == "xml":
        return Reply(200, _item_xml(xsi, fields).encode(), "text/xml")
    rows = "".join(f"<tr><th>{xml(k)}</th><td>{xml(str(v))}</td></tr>" for k, v in fields.items())
    return Reply(
        200,
        f"<html><body><h2>{xml(xsi)}</h2><table>{rows}</table></body></html>".encode(),
        "text/html",
    )


def qs(req: Request, xsi: str, name: str) -> str | None:
    """A field given as shortcut (``type=``) or xpath (``xnat:mrScanData/type=``)."""
    if name in req.query:
        return req.query[name]
    lowered = name.lower()
    for key, value in req.query.items():
        if "/" in key and key.rsplit("/", 1)[1].lower() == lowered:
            return value
    return None


def qs_fields(req: Request, xsi: str, names: Iterable[str]) -> dict[str, str]:
    """The fields of ``names`` the query gives, by shortcut or xpath."""
    found = {name: qs(req, xsi, name) for name in names}
    return {name: value for name, value in found.items() if value is not None}


def xml(text: str) -> str:
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
    attrs = " ".join(f'{k}="{xml(str(v))}"' for k, v in fields.items())
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} {attrs} '
        f'xmlns:{prefix}="http://nrg.wustl.edu/{prefix}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>\n'
    )
