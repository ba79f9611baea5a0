"""Downloads from the sandbox over real HTTP (xnat-api.md 3).

Zips of scans and resources, and single files.

Read-only, against the shared seeded ``demo_sandbox``.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

import pydicom
import pytest
import requests

from hpcbridge.sandbox import SandboxServer

T = 10


@pytest.fixture(scope="module")
def eid(demo_sandbox: SandboxServer) -> str:
    """Accession ID of Haofei01_MR1."""
    resp = requests.get(
        demo_sandbox.url + "/data/projects/PTV000/experiments/Haofei01_MR1",
        params={"format": "json"},
        auth=(demo_sandbox.user, demo_sandbox.password),
        timeout=T,
    )
    assert resp.status_code == 200
    return str(resp.json()["items"][0]["data_fields"]["ID"])


def fetch_zip(
    http: requests.Session, url: str, **params: str
) -> tuple[requests.Response, zipfile.ZipFile]:
    resp = http.get(url, params={"format": "zip", **params}, timeout=T)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"].startswith("application/zip")
    archive = zipfile.ZipFile(io.BytesIO(resp.content))
    assert archive.testzip() is None
    return resp, archive


def listing(http: requests.Session, url: str) -> list[dict[str, str]]:
    resp = http.get(url, params={"format": "json"}, timeout=T)
    assert resp.status_code == 200
    return list(resp.json()["ResultSet"]["Result"])


def test_scan_resource_zip(demo_sandbox: SandboxServer, admin: requests.Session, eid: str) -> None:
    base = demo_sandbox.url + f"/data/experiments/{eid}/scans/5/resources/DICOM/files"
    resp, archive = fetch_zip(admin, base)
    assert resp.headers["Content-Disposition"] == 'attachment; filename="Haofei01_MR1.zip";'
    assert "Content-Length" not in resp.headers  # streamed: size not known up front
    assert resp.headers.get("Transfer-Encoding") == "chunked"
    names = archive.namelist()
    assert len(names) == 8
    prefix = "Haofei01_MR1/scans/5-ep2d_bold__rest_/resources/DICOM/files/"
    assert all(n.startswith(prefix) for n in names), names
    by_name = {row["Name"]: row for row in listing(admin, base)}
    for name in names:
        data = archive.read(name)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SeriesNumber == 5
        assert ds.SeriesDescription == "ep2d bold (rest)"
        row = by_name[name[len(prefix) :]]
        single = admin.get(demo_sandbox.url + row["URI"], timeout=T)
        assert single.content == data
        assert hashlib.md5(data).hexdigest() == row["digest"]


def test_scan_zips_by_id_list_type_and_all(
    demo_sandbox: SandboxServer, admin: requests.Session, eid: str
) -> None:
    scans = demo_sandbox.url + f"/data/experiments/{eid}/scans"

    def folders(spec: str) -> dict[str, int]:
        _, archive = fetch_zip(admin, f"{scans}/{spec}/files")
        counts: dict[str, int] = {}
        for name in archive.namelist():
            label, kind, folder, res_kw, res, files_kw, _ = name.split("/", 6)
            assert (label, kind, res_kw, res, files_kw) == (
                "Haofei01_MR1",
                "scans",
                "resources",
                "DICOM",
                "files",
            )
            counts[folder] = counts.get(folder, 0) + 1
        return counts

    assert folders("4") == {"4-Ax_3D_T1": 12}
    assert folders("1,4") == {"1-Localizer": 3, "4-Ax_3D_T1": 12}
    assert folders("Localizer") == {"1-Localizer": 3}
    assert folders("ALL") == {
        "1-Localizer": 3,
        "4-Ax_3D_T1": 12,
        "5-ep2d_bold__rest_": 8,
        "99-PhoenixZIPReport": 1,
    }


def test_zip_via_project_subject_path(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    url = (
        demo_sandbox.url + "/data/projects/PTV000/subjects/Haofei02/experiments/Haofei02_MR1"
        "/scans/99/resources/DICOM/files"
    )
    resp, archive = fetch_zip(admin, url)
    assert resp.headers["Content-Disposition"] == 'attachment; filename="Haofei02_MR1.zip";'
    name = "Haofei02_MR1/scans/99-PhoenixZIPReport/resources/DICOM/files/phoenix_report.txt"
    assert archive.namelist() == [name]
    assert archive.read(name).startswith(b"Phoenix protocol report for Haofei02_MR1")


def test_zip_structures(demo_sandbox: SandboxServer, admin: requests.Session, eid: str) -> None:
    url = demo_sandbox.url + f"/data/experiments/{eid}/scans/5/files"
    _, simplified = fetch_zip(admin, url, structure="simplified")
    assert "Haofei01_MR1/scans/5/DICOM/0001.dcm" in simplified.namelist()
    assert len(simplified.namelist()) == 8
    _, improved = fetch_zip(admin, url, structure="improved")
    assert "scans/5_ep2d bold (rest)/DICOM/0001.dcm" in improved.namelist()
    _, default = fetch_zip(admin, url)
    for name in simplified.namelist():  # same bytes, only the layout differs
        tail = name.rsplit("/", 1)[1]
        assert simplified.read(name) == default.read(
            f"Haofei01_MR1/scans/5-ep2d_bold__rest_/resources/DICOM/files/{tail}"
        )


def test_zip_with_no_matching_files(
    demo_sandbox: SandboxServer, admin: requests.Session, eid: str
) -> None:
    url = demo_sandbox.url + f"/data/experiments/{eid}/scans/1/resources/DICOM/files/none*"
    resp = admin.get(url, params={"format": "zip"}, timeout=T)
    assert resp.status_code == 404
    resp = admin.get(url, params={"format": "zip", "accept-not-found": "true"}, timeout=T)
    assert resp.status_code == 204 and resp.content == b""


def test_single_file_get_and_head(
    demo_sandbox: SandboxServer, admin: requests.Session, eid: str
) -> None:
    base = demo_sandbox.url + f"/data/experiments/{eid}/scans"
    dcm = listing(admin, base + "/4/resources/DICOM/files")[0]
    resp = admin.get(demo_sandbox.url + dcm["URI"], timeout=T)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/octet-stream")
    assert resp.headers["Content-Disposition"] == f'attachment; filename="{dcm["Name"]}";'
    assert resp.headers["Content-Length"] == dcm["Size"] == str(len(resp.content))
    assert resp.headers["Last-Modified"].endswith(" GMT")
    assert pydicom.dcmread(io.BytesIO(resp.content)).SeriesDescription == "Ax 3D T1"
    head = admin.head(demo_sandbox.url + dcm["URI"], timeout=T)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == dcm["Size"]
    # the same file by resource label, by the path under the scan, and by type
    for path in ("/4/resources/DICOM/files/", "/4/files/", "/Ax 3D T1/resources/DICOM/files/"):
        again = admin.get(base + path + dcm["Name"], timeout=T)
        assert again.status_code == 200 and again.content == resp.content, path

    txt = admin.get(base + "/99/resources/DICOM/files/phoenix_report.txt", timeout=T)
    assert txt.status_code == 200
    assert txt.headers["Content-Type"].startswith("text/plain")
    assert txt.headers["Content-Length"] == str(len(txt.content))
    assert txt.text.startswith("Phoenix protocol report for Haofei01_MR1")


def test_missing_file(demo_sandbox: SandboxServer, admin: requests.Session, eid: str) -> None:
    url = demo_sandbox.url + f"/data/experiments/{eid}/scans/4/resources/DICOM/files/9999.dcm"
    resp = admin.get(url, timeout=T)
    assert resp.status_code == 404
    assert "Unable to find file." in resp.text
    assert admin.get(url, params={"accept-not-found": "true"}, timeout=T).status_code == 204
