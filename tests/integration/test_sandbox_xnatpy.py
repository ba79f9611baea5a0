"""Fidelity test: the real third-party client xnatpy 0.8.1 against the sandbox (xnat-api.md 8).

xnatpy builds its object model from the sandbox's schemas and listings, so connecting with full
model parsing, walking the archive, downloading, uploading and disconnecting exercises the shapes
a real XNAT answers with.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

xnat = pytest.importorskip("xnat")

T = 10
SCANS = {
    "1": ("Localizer", 3),
    "4": ("Ax 3D T1", 12),
    "5": ("ep2d bold (rest)", 8),
    "99": ("PhoenixZIPReport", 1),
}


@pytest.fixture(autouse=True)
def quiet_xnatpy() -> Iterator[None]:
    logger = logging.getLogger("xnat")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture()
def own_admin(sandbox: SandboxServer) -> Iterator[requests.Session]:
    """A cookie session for the fresh sandbox, so our own calls open exactly one server session."""
    with requests.Session() as http:
        resp = http.post(
            sandbox.url + "/data/JSESSION", auth=(sandbox.user, sandbox.password), timeout=T
        )
        assert resp.status_code == 200
        yield http


def stats(http: requests.Session, server: SandboxServer) -> dict[str, Any]:
    resp = http.get(server.url + "/sandbox/stats", timeout=T)
    assert resp.status_code == 200
    return dict(resp.json())


def connect(server: SandboxServer, user: str, password: str) -> Any:
    return xnat.connect(server.url, user=user, password=password, loglevel="ERROR")


def test_xnatpy_walks_and_downloads(
    demo_sandbox: SandboxServer, admin: requests.Session, tmp_path: Path
) -> None:
    before = stats(admin, demo_sandbox)
    session = connect(demo_sandbox, demo_sandbox.user, demo_sandbox.password)
    try:
        project = session.projects["PTV000"]
        assert project.name == "Artemis dcm2niix demo"
        subjects = {s.label: s for s in project.subjects.values()}
        assert sorted(subjects) == ["Haofei01", "Haofei02", "Haofei03"]
        for label, subject in subjects.items():
            experiments = list(subject.experiments.values())
            assert [e.label for e in experiments] == [f"{label}_MR1"]
            expt = experiments[0]
            assert type(expt).__name__ == "MrSessionData"
            assert expt.project == "PTV000" and expt.subject_id == subject.id
            scans = {s.id: s for s in expt.scans.values()}
            assert sorted(scans) == sorted(SCANS)
            for sid, scan in scans.items():
                assert type(scan).__name__ == "MrScanData"
                assert scan.type == SCANS[sid][0]
                resources = {r.label: r for r in scan.resources.values()}
                assert list(resources) == ["DICOM"]
                assert type(resources["DICOM"]).__name__ == "ResourceCatalog"
                assert len(resources["DICOM"].files) == SCANS[sid][1]

        scan = subjects["Haofei01"].experiments["Haofei01_MR1"].scans["4"]
        resource = scan.resources["DICOM"]
        fobj = resource.files["0003.dcm"]
        target = tmp_path / "0003.dcm"
        fobj.download(str(target), verbose=False)  # xnatpy checks the listing's MD5 digest
        direct = admin.get(demo_sandbox.url + fobj.uri, timeout=T)
        assert direct.status_code == 200
        assert target.read_bytes() == direct.content
        assert int(fobj.size) == len(direct.content)  # a HEAD's Content-Length

        zip_path = tmp_path / "dicom.zip"
        resource.download(str(zip_path), verbose=False)
        with zipfile.ZipFile(zip_path) as archive:
            assert archive.testzip() is None
            names = archive.namelist()
            assert len(names) == 12
            assert all(
                n.startswith("Haofei01_MR1/scans/4-Ax_3D_T1/resources/DICOM/files/") for n in names
            )
            assert archive.read(names[2]) == direct.content

        # direct lookup by accession ID goes through the item JSON
        eid = subjects["Haofei02"].experiments["Haofei02_MR1"].id
        assert session.experiments[eid].label == "Haofei02_MR1"
    finally:
        session.disconnect()
    after = stats(admin, demo_sandbox)
    assert after["sessions_created"] == before["sessions_created"] + 1  # one login, reused
    assert after["sessions_live"] == before["sessions_live"]  # and ended on disconnect


def test_xnatpy_creates_resource_and_uploads(
    sandbox: SandboxServer, own_admin: requests.Session, tmp_path: Path
) -> None:
    before = stats(own_admin, sandbox)
    payload = b"\x5c\x01\x00\x00" + bytes(range(256)) * 64
    source = tmp_path / "t1.nii"
    source.write_bytes(payload)
    session = connect(sandbox, sandbox.user, sandbox.password)
    try:
        scan = (
            session.projects["PTV000"].subjects["Haofei01"].experiments["Haofei01_MR1"].scans["4"]
        )
        resource = scan.create_resource("NIFTI", format="NIFTI")
        assert resource.label == "NIFTI"
        resource.upload(str(source), "t1.nii", verbose=False)
        resource.upload_data(b"derived notes\n", "sub/notes.txt", verbose=False)
        assert sorted(resource.files.keys()) == ["sub/notes.txt", "t1.nii"]
        back = tmp_path / "back.nii"
        resource.files["t1.nii"].download(str(back), verbose=False)
        assert back.read_bytes() == payload
        scan.clearcache()
        assert {r.label for r in scan.resources.values()} == {"DICOM", "NIFTI"}
    finally:
        session.disconnect()

    # what the server stored, seen without xnatpy
    base = (
        sandbox.url + "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"
        "/scans/4/resources"
    )
    rows = own_admin.get(base, params={"format": "json"}, timeout=T).json()["ResultSet"]["Result"]
    nifti = {r["label"]: r for r in rows}["NIFTI"]
    assert nifti["format"] == "NIFTI" and nifti["file_count"] == "2"
    listed = own_admin.get(base + "/NIFTI/files", params={"format": "json"}, timeout=T).json()
    by_name = {r["Name"]: r for r in listed["ResultSet"]["Result"]}
    assert by_name["t1.nii"]["digest"] == hashlib.md5(payload).hexdigest()
    assert by_name["t1.nii"]["Size"] == str(len(payload))
    got = own_admin.get(sandbox.url + by_name["t1.nii"]["URI"], timeout=T)
    assert got.content == payload
    after = stats(own_admin, sandbox)
    assert after["sessions_created"] == before["sessions_created"] + 1
    assert after["sessions_live"] == before["sessions_live"]


def test_xnatpy_connects_with_an_alias_token(
    sandbox: SandboxServer, own_admin: requests.Session
) -> None:
    token = own_admin.get(sandbox.url + "/data/services/tokens/issue", timeout=T).json()
    before = stats(own_admin, sandbox)
    session = connect(sandbox, token["alias"], token["secret"])
    try:
        assert "PTV000" in session.projects
        subject = session.projects["PTV000"].subjects["Haofei03"]
        expt = subject.experiments["Haofei03_MR1"]
        report = expt.scans["99"].resources["DICOM"].files["phoenix_report.txt"]
        with io.BytesIO() as buf:
            report.download_stream(buf, verbose=False)
            assert buf.getvalue().startswith(b"Phoenix protocol report for Haofei03_MR1")
    finally:
        session.disconnect()
    after = stats(own_admin, sandbox)
    assert after["sessions_live"] == before["sessions_live"]
    assert after["sessions_created"] == before["sessions_created"] + 1
