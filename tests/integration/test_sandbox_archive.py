"""Creating archive objects on the sandbox over real HTTP (xnat-api.md 4.1, 5), and persistence
of the archive across a restart on the same data folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

T = 10


@pytest.fixture()
def http(sandbox: SandboxServer) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = (sandbox.user, sandbox.password)
        yield session


def rows(http: requests.Session, url: str, **params: str) -> list[dict[str, Any]]:
    resp = http.get(url, params={"format": "json", **params}, timeout=T)
    assert resp.status_code == 200, resp.text[:300]
    return list(resp.json()["ResultSet"]["Result"])


def item_fields(http: requests.Session, url: str) -> dict[str, Any]:
    resp = http.get(url, params={"format": "json"}, timeout=T)
    assert resp.status_code == 200, resp.text[:300]
    return dict(resp.json()["items"][0]["data_fields"])


def test_put_project(sandbox: SandboxServer, http: requests.Session) -> None:
    url = sandbox.url + "/data/projects/NEWPROJ"
    resp = http.put(
        url,
        params={
            "xsiType": "xnat:projectData",
            "req_format": "qs",
            "xnat:projectData/name": "A new project",
        },
        timeout=T,
    )
    assert resp.status_code in (200, 201)
    listed = {r["ID"]: r for r in rows(http, sandbox.url + "/data/projects")}
    assert listed["NEWPROJ"]["name"] == "A new project"
    assert listed["NEWPROJ"]["URI"] == "/data/projects/NEWPROJ"
    assert item_fields(http, url)["ID"] == "NEWPROJ"
    bad = http.put(
        sandbox.url + "/data/projects/bad.id!", params={"xsiType": "xnat:projectData"}, timeout=T
    )
    assert bad.status_code == 417
    assert "Invalid character in project ID." in bad.text
    assert "bad.id!" not in {r["ID"] for r in rows(http, sandbox.url + "/data/projects")}


def test_put_project_needs_create_rights(sandbox: SandboxServer) -> None:
    sandbox.add_user("carol", "carol-pw")
    with requests.Session() as carol:
        carol.auth = ("carol", "carol-pw")
        resp = carol.put(sandbox.url + "/data/projects/CAROLS", timeout=T)
        assert resp.status_code == 403
    with requests.Session() as admin:
        admin.auth = (sandbox.user, sandbox.password)
        assert "CAROLS" not in {r["ID"] for r in rows(admin, sandbox.url + "/data/projects")}


def test_put_subject(sandbox: SandboxServer, http: requests.Session) -> None:
    url = sandbox.url + "/data/projects/PTV000/subjects/Newbie"
    created = http.put(url, timeout=T)
    assert created.status_code == 201
    sid = created.text.strip()
    assert sid.startswith("XNAT_S")
    again = http.put(url, timeout=T)
    assert again.status_code == 200 and again.text.strip() == sid
    listed = {
        r["label"]: r["ID"] for r in rows(http, sandbox.url + "/data/projects/PTV000/subjects")
    }
    assert listed["Newbie"] == sid
    assert item_fields(http, sandbox.url + f"/data/subjects/{sid}")["label"] == "Newbie"


def test_put_experiment(sandbox: SandboxServer, http: requests.Session) -> None:
    url = sandbox.url + "/data/projects/PTV000/subjects/Haofei04/experiments/Haofei04_MR1"
    missing_type = http.put(url, timeout=T)
    assert missing_type.status_code == 417
    assert "Need PUT Contents" in missing_type.text
    created = http.put(
        url,
        params={"xsiType": "xnat:mrSessionData", "xnat:mrSessionData/date": "2024-02-01"},
        timeout=T,
    )
    assert created.status_code == 201
    eid = created.text.strip()
    assert eid.startswith("XNAT_E")
    # the subject did not exist: XNAT creates it with the label from the URL
    subjects = {
        r["label"]: r["ID"] for r in rows(http, sandbox.url + "/data/projects/PTV000/subjects")
    }
    assert "Haofei04" in subjects
    fields = item_fields(http, sandbox.url + f"/data/experiments/{eid}")
    assert fields["label"] == "Haofei04_MR1" and fields["subject_ID"] == subjects["Haofei04"]
    assert fields["project"] == "PTV000" and fields["date"] == "2024-02-01"
    again = http.put(url, params={"xsiType": "xnat:mrSessionData"}, timeout=T)
    assert again.status_code == 200 and again.text.strip() == eid
    listed = rows(http, sandbox.url + "/data/experiments", project="PTV000")
    assert {r["label"]: r["subject_label"] for r in listed}["Haofei04_MR1"] == "Haofei04"


def test_put_scan(sandbox: SandboxServer, http: requests.Session) -> None:
    session = sandbox.url + "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"
    resp = http.put(
        session + "/scans/7",
        params={
            "xsiType": "xnat:mrScanData",
            "xnat:mrScanData/type": "T2 FLAIR",
            "xnat:mrScanData/series_description": "t2_flair_ax",
        },
        timeout=T,
    )
    assert resp.status_code == 200
    scans = {r["ID"]: r for r in rows(http, session + "/scans")}
    assert scans["7"]["type"] == "T2 FLAIR" and scans["7"]["series_description"] == "t2_flair_ax"
    assert scans["7"]["xsiType"] == "xnat:mrScanData"
    # the type shortcut updates an existing scan
    assert (
        http.put(
            session + "/scans/7", params={"xsiType": "xnat:mrScanData", "type": "FLAIR"}, timeout=T
        ).status_code
        == 200
    )
    assert {r["ID"]: r["type"] for r in rows(http, session + "/scans")}["7"] == "FLAIR"
    abstract = http.put(session + "/scans/8", params={"xsiType": "xnat:imageScanData"}, timeout=T)
    assert abstract.status_code == 400
    assert "8" not in {r["ID"] for r in rows(http, session + "/scans")}
    retyped = http.put(session + "/scans/7", params={"xsiType": "xnat:ctScanData"}, timeout=T)
    assert retyped.status_code == 409
    assert {r["ID"]: r["xsiType"] for r in rows(http, session + "/scans")}["7"] == "xnat:mrScanData"


def test_put_assessor(sandbox: SandboxServer, http: requests.Session) -> None:
    session = sandbox.url + "/data/projects/PTV000/subjects/Haofei02/experiments/Haofei02_MR1"
    resp = http.put(
        session + "/assessors/Haofei02_QC",
        params={"xsiType": "xnat:qcAssessmentData", "label": "Haofei02_QC", "req_format": "qs"},
        timeout=T,
    )
    assert resp.status_code == 201
    aid = resp.text.strip()
    assert aid
    listed = {r["label"]: r for r in rows(http, session + "/assessors")}
    assert listed["Haofei02_QC"]["ID"] == aid
    assert listed["Haofei02_QC"]["xsiType"] == "xnat:qcAssessmentData"
    assert item_fields(http, session + f"/assessors/{aid}")["label"] == "Haofei02_QC"


def test_put_resource(sandbox: SandboxServer, http: requests.Session) -> None:
    scan = sandbox.url + "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1/scans/4"
    resp = http.put(
        scan + "/resources/NIFTI", params={"format": "NIFTI", "content": "derived"}, timeout=T
    )
    assert resp.status_code == 200
    listed = {r["label"]: r for r in rows(http, scan + "/resources")}
    assert listed["NIFTI"]["format"] == "NIFTI" and listed["NIFTI"]["content"] == "derived"
    assert listed["NIFTI"]["file_count"] == "0" and listed["NIFTI"]["cat_id"] == "4"
    again = http.put(scan + "/resources/NIFTI", timeout=T)
    assert again.status_code == 409
    assert "Specified resource already exists." in again.text
    # an empty resource has nothing to zip
    empty = http.get(scan + "/resources/NIFTI/files", params={"format": "zip"}, timeout=T)
    assert empty.status_code == 404
    # experiment-level resources list only themselves, not the scans'
    session = scan.rsplit("/scans/", 1)[0]
    assert http.put(session + "/resources/QA", timeout=T).status_code == 200
    level = rows(http, session + "/resources")
    assert [r["label"] for r in level] == ["QA"] and level[0]["category"] == "resources"


def test_archive_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "persistent"
    payload = b"persisted bytes\n" * 100
    with SandboxServer(data_dir, seed="demo") as first, requests.Session() as http:
        http.auth = (first.user, first.password)
        assert http.put(first.url + "/data/projects/KEEP", timeout=T).status_code in (200, 201)
        url = (
            first.url + "/data/projects/PTV000/subjects/Haofei03/experiments/Haofei03_MR1"
            "/resources/SAVED/files/sub/kept.txt"
        )
        assert http.put(url, params={"inbody": "true"}, data=payload, timeout=T).status_code == 200
        path = url[len(first.url) :]
    with SandboxServer(data_dir, seed=None) as second, requests.Session() as http:
        http.auth = (second.user, second.password)
        assert {"KEEP", "PTV000"} <= {r["ID"] for r in rows(http, second.url + "/data/projects")}
        listed = rows(http, second.url + path.rsplit("/files/", 1)[0] + "/files")
        assert [r["Name"] for r in listed] == ["kept.txt"]
        assert listed[0]["digest"] == hashlib.md5(payload).hexdigest()
        assert http.get(second.url + path, timeout=T).content == payload
        # the seeded DICOM is still there too
        dicom = rows(
            http,
            second.url + "/data/projects/PTV000/subjects/Haofei01/experiments"
            "/Haofei01_MR1/scans/4/resources/DICOM/files",
        )
        assert len(dicom) == 12
        got = http.get(second.url + dicom[0]["URI"], timeout=T).content
        assert hashlib.md5(got).hexdigest() == dicom[0]["digest"]
