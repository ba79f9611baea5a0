"""Browsing for ``hpcbridge ls``: what lies at an address, in XNAT's own keys."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .address import Address
from .client import XnatClient


@dataclass(frozen=True)
class Listing:
    kind: str  # projects, subjects, experiments, scans, resources
    rows: list[dict[str, Any]] = field(default_factory=list)


def _exp_path(a: Address) -> str:
    return f"/data/projects/{a.project}/subjects/{a.subject}/experiments/{a.experiment}"


def ls(client: XnatClient, address: Address) -> Listing:
    """List what is below ``address`` with as few requests as XNAT allows."""
    if address.depth == 0:
        return Listing("projects", client.listing("/data/projects", "the project list"))
    if address.depth == 1:
        path = f"/data/projects/{address.project}/subjects"
        return Listing("subjects", client.listing(path, f"subjects of {address}"))
    if address.depth == 2:
        path = f"/data/projects/{address.project}/subjects/{address.subject}/experiments"
        return Listing("experiments", client.listing(path, f"experiments of {address}"))
    if address.depth == 3:
        return Listing("scans", _scans(client, address))
    return Listing("resources", _resources(client, address))


def _scans(client: XnatClient, address: Address) -> list[dict[str, Any]]:
    base = _exp_path(address)
    scans = client.listing(f"{base}/scans", f"scans of {address}")
    # One request for every scan's resources: scans/ALL names all scans at once.
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if scans:
        for res in client.listing(f"{base}/scans/ALL/resources", f"scan resources of {address}"):
            total = counts[str(res.get("cat_id", ""))]
            total[0] += res.get("file_count") or 0
            total[1] += res.get("file_size") or 0
    for scan in scans:
        scan["file_count"], scan["file_size"] = counts[str(scan["ID"])]
    return scans


def _resources(client: XnatClient, address: Address) -> list[dict[str, Any]]:
    base = f"{_exp_path(address)}/scans/{address.scan}"
    resources = client.listing(f"{base}/resources", f"resources of {address}")
    files = client.listing(f"{base}/files", f"files of {address}") if resources else []
    for res in resources:
        res["files"] = [f for f in files if f.get("cat_ID") == res["xnat_abstractresource_id"]]
    return resources
