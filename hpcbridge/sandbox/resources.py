"""Resources (XNAT's catalogs) of any owner: listing, lookup by label or numeric id (comma lists
too), creation on PUT or on a first upload, deletion and the catalog XML.
"""

from __future__ import annotations

from typing import Any

from . import files, uploads
from .http import HttpError, Reply, Request
from .views import Owner, Site, cells, not_found, only_get, table, xml

RESOURCE_COLUMNS = (
    "xnat_abstractresource_id label element_name category cat_id cat_desc file_count file_size"
    " tags content format"
).split()
NO_CATALOG = "Unable to find the specified catalog."


def owner_tail(site: Site, req: Request, owners: Owner | list[Owner], rest: list[str]) -> Reply:
    """Route what follows an owner's URI: ``resources[/...]`` or ``files[/...]``."""
    owners = owners if isinstance(owners, list) else [owners]
    what = rest[0]
    if what == "resources":
        if len(rest) == 1:
            return _listing(site, req, owners)
        return _resource(site, req, owners, rest[1], rest[2:])
    if what == "files":
        return files.files(site, req, owners, None, "/".join(rest[1:]))
    raise not_found()


def _row(site: Site, owner: Owner, res: dict[str, Any]) -> dict[str, Any]:
    count, size = site.store.resource_stats(res["id"])
    spec = "xnat_abstractresource_id=id label element_name category cat_id cat_desc file_count"
    return cells(
        res,
        spec + " file_size tags content format",
        element_name="xnat:resourceCatalog",
        category=owner.category,
        cat_id=owner.cat_id,
        cat_desc=owner.cat_desc,
        file_count=count,
        file_size=size,
    )


def _listing(site: Site, req: Request, owners: list[Owner]) -> Reply:
    only_get(req)
    rows = [_row(site, o, res) for o in owners for res in files.resources_of(site, o)]
    return table(req, rows, RESOURCE_COLUMNS, meta={"title": "Resources"}, fixed=True)


def _find(site: Site, owners: list[Owner], spec: str) -> list[tuple[Owner, dict[str, Any]]]:
    wanted = spec.split(",")
    return [
        (owner, res)
        for owner in owners
        for res in files.resources_of(site, owner)
        if any((w.isdigit() and int(w) == res["id"]) or w == res["label"] for w in wanted)
    ]


def _resource(site: Site, req: Request, owners: list[Owner], spec: str, rest: list[str]) -> Reply:
    found = _find(site, owners, spec)
    if not rest:
        return _catalog(site, req, owners, spec, found)
    if rest[0] != "files":
        raise not_found()
    path = "/".join(rest[1:])
    if req.method not in ("PUT", "POST"):
        if not found:
            raise not_found(NO_CATALOG)
        return files.files(site, req, owners, found, path)
    if found:
        return uploads.upload(site, req, found[0][1], path)
    if spec.isdigit():
        raise not_found(NO_CATALOG)
    res = _create(site, req, owners[0], spec)
    try:
        return uploads.upload(site, req, res, path)
    except BaseException:
        # The resource exists only for this upload; a refused upload takes it back.
        site.store.delete_resource(res["id"])
        raise


def _catalog(
    site: Site,
    req: Request,
    owners: list[Owner],
    spec: str,
    found: list[tuple[Owner, dict[str, Any]]],
) -> Reply:
    """The resource itself: create it (PUT), delete it, or answer its catalog XML."""
    if req.method in ("PUT", "POST"):
        if found:
            raise HttpError(409, "Specified resource already exists.")
        _create(site, req, owners[0], spec)
        return Reply()
    if not found:
        raise not_found(NO_CATALOG)
    if req.method == "DELETE":
        for _, res in found:
            site.store.delete_resource(res["id"])
        return Reply()
    return _catalog_xml(site, found[0][1])


def _create(site: Site, req: Request, owner: Owner, label: str) -> dict[str, Any]:
    if not label or label.isdigit():
        raise HttpError(400, "Resource labels made only of digits cannot be addressed.")
    names = ("format", "content", "tags", "description")
    fields = {k: req.query[k] for k in names if k in req.query}
    return site.store.create_resource(owner.kind, owner.id, label, owner.inout, **fields)


def _catalog_xml(site: Site, res: dict[str, Any]) -> Reply:
    entries = "".join(
        f'<cat:entry URI="{xml(f.path)}" ID="{xml(f.path)}" digest="{f.digest}"'
        f' format="{xml(f.format)}" content="{xml(f.content)}"/>\n'
        for f in site.store.files(res["id"])
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog '
        'xmlns:cat="http://nrg.wustl.edu/catalog" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'ID="{res["id"]}" label="{xml(res["label"])}" format="{xml(res["format"])}" '
        f'content="{xml(res["content"])}">\n<cat:entries>\n{entries}</cat:entries>\n'
        "</cat:Catalog>\n"
    )
    return Reply(200, body.encode(), "text/xml")
