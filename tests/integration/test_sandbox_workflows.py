"""Workflow entries (wrk:workflowData) of the sandbox over real HTTP (xnat-api.md 6.1)."""

from __future__ import annotations

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

T = 10
BOB = ("bob", "pw")
ENTRY = {
    "id": "XNAT_E00001",
    "pipeline_name": "hpcbridge-dcm2niix",
    "launch_time": "2024-01-02 10:00:00",
    "data_type": "xnat:mrSessionData",
}


@pytest.fixture()
def sb(make_sandbox) -> SandboxServer:
    server = make_sandbox(seed=None)
    server.add_user("bob", "pw")
    return server


def wrk(**fields: str) -> dict[str, str]:
    return {f"wrk:workflowData/{k}": v for k, v in fields.items()}


def put(
    server: SandboxServer, path: str = "", auth: tuple[str, str] | None = None, **fields: str
) -> requests.Response:
    return requests.put(
        server.url + "/data/workflows" + path,
        params=wrk(**fields),
        auth=auth or (server.user, server.password),
        timeout=T,
    )


def find(server: SandboxServer, **fields: str) -> list[dict]:
    resp = requests.get(
        server.url + "/data/workflows",
        params={"format": "json", **wrk(**fields)},
        auth=(server.user, server.password),
        timeout=T,
    )
    assert resp.status_code == 200, resp.text
    return [item["data_fields"] for item in resp.json()["items"]]


def test_create_workflow_entry(sb):
    resp = put(sb, **ENTRY, status="Queued")
    assert resp.status_code == 200
    assert resp.content == b""

    items = find(sb, id=ENTRY["id"])
    assert len(items) == 1
    entry = items[0]
    assert entry["status"] == "Queued"
    assert entry["pipeline_name"] == ENTRY["pipeline_name"]
    assert entry["launch_time"] == ENTRY["launch_time"]
    assert entry["data_type"] == ENTRY["data_type"]
    assert type(entry["wrk_workflowData_id"]) is int


@pytest.mark.parametrize("missing", ["id", "pipeline_name", "launch_time", "data_type"])
def test_create_without_a_required_field_is_400(sb, missing):
    fields = {k: v for k, v in ENTRY.items() if k != missing}
    resp = put(sb, **fields, status="Queued")
    assert resp.status_code == 400
    assert find(sb) == []


def test_same_key_updates_the_entry(sb):
    assert put(sb, **ENTRY, status="Queued").status_code == 200
    wid = find(sb, **{k: ENTRY[k] for k in ("id", "pipeline_name", "launch_time")})[0][
        "wrk_workflowData_id"
    ]
    assert put(sb, **ENTRY, status="Running").status_code == 200
    assert put(sb, **ENTRY, status="Complete").status_code == 200

    items = find(
        sb, id=ENTRY["id"], pipeline_name=ENTRY["pipeline_name"], launch_time=ENTRY["launch_time"]
    )
    assert len(items) == 1
    assert items[0]["status"] == "Complete"
    assert items[0]["wrk_workflowData_id"] == wid


def test_entries_differing_in_a_key_field_are_separate(sb):
    assert put(sb, **ENTRY, status="Queued").status_code == 200
    assert (
        put(sb, **{**ENTRY, "launch_time": "2024-01-02 11:00:00"}, status="Queued").status_code
        == 200
    )
    assert put(sb, **ENTRY, scan_id="4", status="Queued").status_code == 200
    assert put(sb, **{**ENTRY, "pipeline_name": "other"}, status="Failed").status_code == 200

    assert len(find(sb, id=ENTRY["id"])) == 4
    assert len({e["wrk_workflowData_id"] for e in find(sb, id=ENTRY["id"])}) == 4
    only = find(sb, id=ENTRY["id"], pipeline_name="other")
    assert [e["status"] for e in only] == ["Failed"]


def test_update_by_workflow_id(sb):
    assert put(sb, **ENTRY, status="Running").status_code == 200
    wid = find(sb, id=ENTRY["id"])[0]["wrk_workflowData_id"]

    resp = put(sb, f"/{wid}", status="Failed")
    assert resp.status_code == 200
    assert [e["status"] for e in find(sb, id=ENTRY["id"])] == ["Failed"]

    item = requests.get(
        f"{sb.url}/data/workflows/{wid}",
        params={"format": "json"},
        auth=(sb.user, sb.password),
        timeout=T,
    )
    assert item.status_code == 200
    assert item.json()["items"][0]["data_fields"]["status"] == "Failed"


@pytest.mark.parametrize("wid", ["999", "not-a-number"])
def test_unknown_workflow_id_is_404(sb, wid):
    assert put(sb, f"/{wid}", status="Failed").status_code == 404
    resp = requests.get(f"{sb.url}/data/workflows/{wid}", auth=(sb.user, sb.password), timeout=T)
    assert resp.status_code == 404


def test_only_creator_or_admin_may_modify(sb):
    assert put(sb, **ENTRY, status="Running").status_code == 200
    wid = find(sb, id=ENTRY["id"])[0]["wrk_workflowData_id"]

    assert put(sb, auth=BOB, **ENTRY, status="Failed").status_code == 403
    assert put(sb, f"/{wid}", auth=BOB, status="Failed").status_code == 403
    assert [e["status"] for e in find(sb, id=ENTRY["id"])] == ["Running"]

    bobs = {**ENTRY, "pipeline_name": "bobs-job"}
    assert put(sb, auth=BOB, **bobs, status="Queued").status_code == 200
    assert put(sb, auth=BOB, **bobs, status="Running").status_code == 200  # creator
    assert put(sb, **bobs, status="Complete").status_code == 200  # site admin
    assert [e["status"] for e in find(sb, pipeline_name="bobs-job")] == ["Complete"]


def test_unauthenticated_put_is_401(sb):
    resp = requests.put(sb.url + "/data/workflows", params=wrk(**ENTRY, status="Queued"), timeout=T)
    assert resp.status_code == 401
    assert find(sb) == []


def test_extra_fields_are_stored_and_returned(sb):
    extra = {
        "jobID": "12345.pbs01",
        "percentageComplete": "10",
        "details": "queued on pbs01",
        "ExternalID": "PTV000",
        "step_description": "convert",
    }
    assert put(sb, **ENTRY, status="Queued", **extra).status_code == 200
    entry = find(sb, id=ENTRY["id"])[0]
    for key, value in extra.items():
        assert entry[key] == value, key

    assert put(sb, **ENTRY, status="Running", percentageComplete="50").status_code == 200
    entry = find(sb, id=ENTRY["id"])[0]
    assert entry["percentageComplete"] == "50"
    assert entry["jobID"] == "12345.pbs01"  # fields not sent again are kept
    assert entry["status"] == "Running"
