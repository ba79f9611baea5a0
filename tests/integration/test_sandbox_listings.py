"""Listings and single items of the sandbox over real HTTP, checked against xnat-api.md 2.x.

Read-only: everything here runs against the shared seeded ``demo_sandbox`` (project PTV000,
subjects Haofei01..03, one MR session each with scans 1, 4, 5 and 99).
"""

from __future__ import annotations

import csv
import hashlib
import io
from typing import Any

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

T = 10  # seconds; every request carries a timeout

PROJECT_COLUMNS = [
    "ID",
    "secondary_ID",
    "name",
    "description",
    "pi_firstname",
    "pi_lastname",
    "URI",
]
SUBJECT_COLUMNS = ["ID", "project", "label", "insert_date", "insert_user", "URI"]
EXPT_COLUMNS = ["ID", "project", "date", "xsiType", "label", "insert_date", "URI"]
SCAN_COLUMNS = [
    "xnat_imagescandata_id",
    "ID",
    "type",
    "quality",
    "xsiType",
    "note",
    "series_description",
    "URI",
]
RESOURCE_COLUMNS = [
    "xnat_abstractresource_id",
    "label",
    "element_name",
    "category",
    "cat_id",
    "cat_desc",
    "file_count",
    "file_size",
    "tags",
    "content",
    "format",
]
FILE_COLUMNS = [
    "Name",
    "Size",
    "URI",
    "collection",
    "file_tags",
    "file_format",
    "file_content",
    "cat_ID",
    "digest",
]
SESSIONS = ["Haofei01_MR1", "Haofei02_MR1", "Haofei03_MR1"]


def get(http: requests.Session, url: str, **params: str) -> requests.Response:
    return http.get(url, params=params, timeout=T)


def result_set(http: requests.Session, url: str, **params: str) -> dict[str, Any]:
    resp = get(http, url, **params)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json()["ResultSet"]


def assert_all_strings(rs: dict[str, Any]) -> None:
    """XFTTable.toJSON: every cell and every meta value is a string."""
    for row in rs["Result"]:
        for key, value in row.items():
            assert isinstance(value, str), (key, value)
    for key, value in rs.items():
        if key not in ("Result", "Columns"):
            assert isinstance(value, str), (key, value)


@pytest.fixture(scope="module")
def ids(demo_sandbox: SandboxServer) -> dict[str, str]:
    """Accession IDs of the demo seed by label, as the server reports them."""
    with requests.Session() as http:
        http.auth = (demo_sandbox.user, demo_sandbox.password)
        subjects = result_set(http, demo_sandbox.url + "/data/projects/PTV000/subjects")
        expts = result_set(http, demo_sandbox.url + "/data/projects/PTV000/experiments")
        http.delete(demo_sandbox.url + "/data/JSESSION", timeout=T)
    out = {r["label"]: r["ID"] for r in subjects["Result"]}
    out.update({r["label"]: r["ID"] for r in expts["Result"]})
    return out


# -- projects ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/data/projects", "/data/archive/projects", "/REST/projects"])
def test_project_listing_on_every_prefix(
    demo_sandbox: SandboxServer, admin: requests.Session, path: str
) -> None:
    rs = result_set(admin, demo_sandbox.url + path)
    assert sorted(rs["Result"][0]) == sorted(PROJECT_COLUMNS)
    row = rs["Result"][0]
    assert row["ID"] == "PTV000" and row["URI"] == "/data/projects/PTV000"
    assert rs["totalRecords"] == str(len(rs["Result"])) == "1"
    assert "title" not in rs and "Columns" not in rs
    assert_all_strings(rs)


def test_project_listing_as_csv(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    resp = get(admin, demo_sandbox.url + "/data/projects", format="csv")
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(resp.text)))
    assert rows[0]["ID"] == "PTV000" and rows[0]["URI"] == "/data/projects/PTV000"
    assert sorted(rows[0]) == sorted(PROJECT_COLUMNS)


# -- subjects ----------------------------------------------------------------------------------
def test_subject_listing(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    rs = result_set(admin, demo_sandbox.url + "/data/archive/projects/PTV000/subjects")
    assert sorted(rs["Result"][0]) == sorted(SUBJECT_COLUMNS)
    assert sorted(r["label"] for r in rs["Result"]) == ["Haofei01", "Haofei02", "Haofei03"]
    for row in rs["Result"]:
        assert row["project"] == "PTV000"
        assert row["URI"] == f"/data/subjects/{row['ID']}"
        assert row["ID"].startswith("XNAT_S")
    assert rs["totalRecords"] == "3"
    assert_all_strings(rs)


def test_subject_listing_filters(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    url = demo_sandbox.url + "/data/projects/PTV000/subjects"
    assert [r["label"] for r in result_set(admin, url, label="Haofei02")["Result"]] == ["Haofei02"]
    either = result_set(admin, url, label="Haofei01,Haofei03")["Result"]
    assert sorted(r["label"] for r in either) == ["Haofei01", "Haofei03"]
    like = result_set(admin, url, label="Haofei0*")["Result"]
    assert len(like) == 3
    assert result_set(admin, url, label="Nobody*")["Result"] == []


def test_unknown_project_is_404(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    for path in (
        "/data/projects/NOPE/subjects",
        "/data/projects/NOPE/experiments",
        "/data/projects/NOPE?format=json",
    ):
        resp = get(admin, demo_sandbox.url + path)
        assert resp.status_code == 404, path
        assert "Unable to identify project" in resp.text


# -- experiments -------------------------------------------------------------------------------
def test_project_experiment_listing(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    rs = result_set(admin, demo_sandbox.url + "/data/projects/PTV000/experiments")
    assert sorted(rs["Result"][0]) == sorted(EXPT_COLUMNS + ["xnat:subjectassessordata/id"])
    assert sorted(r["label"] for r in rs["Result"]) == SESSIONS
    for row in rs["Result"]:
        assert row["xsiType"] == "xnat:mrSessionData"
        assert row["URI"] == f"/data/experiments/{row['ID']}"
        assert row["xnat:subjectassessordata/id"] == row["ID"]
        assert row["ID"].startswith("XNAT_E")
    assert rs["totalRecords"] == "3" and "title" not in rs
    assert_all_strings(rs)


def test_subject_experiment_listing(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    for ref in ("Haofei02", ids["Haofei02"]):  # subject by label or by accession ID
        rs = result_set(
            admin, demo_sandbox.url + f"/data/projects/PTV000/subjects/{ref}/experiments"
        )
        assert [r["label"] for r in rs["Result"]] == ["Haofei02_MR1"]
        assert rs["totalRecords"] == "1"


def test_matching_experiments(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    rs = result_set(admin, demo_sandbox.url + "/data/experiments", project="PTV000")
    assert rs["title"] == "Matching experiments" and rs["totalRecords"] == "3"
    assert sorted(rs["Result"][0]) == sorted(EXPT_COLUMNS + ["subject_ID", "subject_label"])
    by_label = {r["label"]: r for r in rs["Result"]}
    assert by_label["Haofei03_MR1"]["subject_label"] == "Haofei03"
    assert by_label["Haofei03_MR1"]["subject_ID"] == ids["Haofei03"]
    assert_all_strings(rs)
    other = result_set(admin, demo_sandbox.url + "/data/experiments", project="NOSUCH")
    assert other["Result"] == []
    assert (
        result_set(
            admin,
            demo_sandbox.url + "/data/experiments",
            project="PTV000",
            xsiType="xnat:petSessionData",
        )["Result"]
        == []
    )


def test_one_row_per_scan_in_one_request(
    demo_sandbox: SandboxServer, admin: requests.Session
) -> None:
    """DAX-style: every scan of every session of a project with a single listing call."""
    columns = (
        "ID,label,subject_label,xnat:imagescandata/id,xnat:imagescandata/type,"
        "xnat:imagescandata/series_description"
    )
    rs = result_set(
        admin,
        demo_sandbox.url + "/data/experiments",
        project="PTV000",
        xsiType="xnat:mrSessionData",
        columns=columns,
    )
    rows = rs["Result"]
    assert len(rows) == 12
    assert set(rows[0]) == {
        "ID",
        "label",
        "subject_label",
        "xnat:imagescandata/id",
        "xnat:imagescandata/type",
        "xnat:imagescandata/series_description",
        "URI",
    }
    pairs = {(r["label"], r["xnat:imagescandata/id"]) for r in rows}
    assert pairs == {(s, n) for s in SESSIONS for n in ("1", "4", "5", "99")}
    bold = [r for r in rows if r["xnat:imagescandata/id"] == "5"]
    assert {r["xnat:imagescandata/type"] for r in bold} == {"ep2d bold (rest)"}
    assert {r["subject_label"] for r in rows} == {"Haofei01", "Haofei02", "Haofei03"}
    assert_all_strings(rs)


def test_columns_selection(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    url = demo_sandbox.url + "/data/projects/PTV000/experiments"
    rows = result_set(admin, url, columns="label,no_such_column,ID")["Result"]
    assert set(rows[0]) == {"label", "ID", "URI"}  # unknown ignored, URI appended
    rows = result_set(admin, url, columns="ID,xnat:SubjectAssessorData/ID")["Result"]
    assert set(rows[0]) == {"ID", "xnat:subjectassessordata/id", "URI"}  # xpath lower-cased
    assert all(r["xnat:subjectassessordata/id"] == r["ID"] for r in rows)
    projects = result_set(admin, demo_sandbox.url + "/data/archive/projects", columns="ID,URI,name")
    assert set(projects["Result"][0]) == {"ID", "URI", "name"}


def test_sorting_and_paging(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    url = demo_sandbox.url + "/data/projects/PTV000/experiments"
    desc = result_set(admin, url, sortBy="label", sortOrder="DESC")
    assert [r["label"] for r in desc["Result"]] == SESSIONS[::-1]
    asc = result_set(admin, url, sortBy="label")
    assert [r["label"] for r in asc["Result"]] == SESSIONS
    page = result_set(admin, url, sortBy="label", limit="2", offset="1")
    assert [r["label"] for r in page["Result"]] == SESSIONS[1:3]
    assert "totalRecords" not in page  # XNAT drops it when paging
    first = result_set(admin, url, sortBy="label", limit="1")
    assert [r["label"] for r in first["Result"]] == SESSIONS[:1]


def test_experiment_listing_filters(demo_sandbox: SandboxServer, admin: requests.Session) -> None:
    url = demo_sandbox.url + "/data/experiments"
    rows = result_set(admin, url, project="PTV000", label="Haofei02_MR1")["Result"]
    assert [r["label"] for r in rows] == ["Haofei02_MR1"]
    rows = result_set(admin, url, project="PTV000", label="*03_MR1,Haofei01_MR1")["Result"]
    assert sorted(r["label"] for r in rows) == ["Haofei01_MR1", "Haofei03_MR1"]


# -- scans, resources, files -------------------------------------------------------------------
def test_scan_listing(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    eid = ids["Haofei01_MR1"]
    paths = [
        f"/data/experiments/{eid}/scans",
        "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1/scans",
        f"/data/archive/projects/PTV000/subjects/{ids['Haofei01']}/experiments/{eid}/scans",
    ]
    for path in paths:
        rs = result_set(admin, demo_sandbox.url + path)
        assert sorted(rs["Result"][0]) == sorted(SCAN_COLUMNS)
        assert [r["ID"] for r in rs["Result"]] == ["1", "4", "5", "99"]
        assert set(rs) == {"Result", "totalRecords"} and rs["totalRecords"] == "4"
        for row in rs["Result"]:
            assert row["URI"] == f"/data/experiments/{eid}/scans/{row['ID']}"
            assert row["xsiType"] == "xnat:mrScanData"
            assert row["xnat_imagescandata_id"].isdigit()
        types = {r["ID"]: r["type"] for r in rs["Result"]}
        assert types == {
            "1": "Localizer",
            "4": "Ax 3D T1",
            "5": "ep2d bold (rest)",
            "99": "PhoenixZIPReport",
        }
        assert_all_strings(rs)
    # XNAT's ScanList ignores filters, so a client must filter scans itself
    ignored = result_set(admin, demo_sandbox.url + paths[0], type="Localizer", ID="4")
    assert [r["ID"] for r in ignored["Result"]] == ["1", "4", "5", "99"]
    assert [
        r["ID"]
        for r in result_set(
            admin, demo_sandbox.url + paths[0], sortBy="ID", sortOrder="DESC", limit="2"
        )["Result"]
    ] == ["99", "5"]


def test_resource_listing(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    url = demo_sandbox.url + f"/data/experiments/{ids['Haofei01_MR1']}/scans/4/resources"
    rs = result_set(admin, url)
    assert rs["title"] == "Resources" and rs["totalRecords"] == "1"
    row = rs["Result"][0]
    assert sorted(row) == sorted(RESOURCE_COLUMNS)  # fixed columns: no URI, no ID
    assert row["label"] == "DICOM" and row["element_name"] == "xnat:resourceCatalog"
    assert row["category"] == "scans" and row["cat_id"] == "4" and row["cat_desc"] == "Ax 3D T1"
    assert row["file_count"] == "12" and int(row["file_size"]) > 0
    assert row["xnat_abstractresource_id"].isdigit() and row["format"] == "DICOM"
    assert_all_strings(rs)
    # columns= does not change a resource listing (CatalogUtils builds fixed columns).
    picked = result_set(admin, url, columns="ID,URI,label,xsiType")
    assert sorted(picked["Result"][0]) == sorted(RESOURCE_COLUMNS)
    all_scans = result_set(
        admin, demo_sandbox.url + f"/data/experiments/{ids['Haofei01_MR1']}/scans/ALL/resources"
    )
    assert sorted(r["cat_id"] for r in all_scans["Result"]) == ["1", "4", "5", "99"]


def test_file_listing(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    eid = ids["Haofei01_MR1"]
    base = demo_sandbox.url + f"/data/experiments/{eid}/scans/1/resources"
    rid = result_set(admin, base)["Result"][0]["xnat_abstractresource_id"]
    rs = result_set(admin, base + "/DICOM/files")
    assert rs["Columns"] == [{"key": "URI", "serverRoot": ""}]
    assert rs["title"] == "Files"
    assert [r["Name"] for r in rs["Result"]] == ["0001.dcm", "0002.dcm", "0003.dcm"]
    assert_all_strings(rs)
    for row in rs["Result"]:
        assert sorted(row) == sorted(FILE_COLUMNS)
        assert row["URI"] == f"/data/experiments/{eid}/scans/1/resources/{rid}/files/{row['Name']}"
        assert row["collection"] == "DICOM" and row["cat_ID"] == rid
        body = get(admin, demo_sandbox.url + row["URI"]).content
        assert row["Size"] == str(len(body))
        assert row["digest"] == hashlib.md5(body).hexdigest()
    # the same resource by numeric id
    by_id = result_set(admin, base + f"/{rid}/files")
    assert [r["URI"] for r in by_id["Result"]] == [r["URI"] for r in rs["Result"]]


def test_file_uris_keep_the_project_subject_prefix(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    url = (
        demo_sandbox.url + "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"
        "/scans/99/resources/DICOM/files"
    )
    row = result_set(admin, url)["Result"][0]
    prefix = f"/data/projects/PTV000/subjects/{ids['Haofei01']}/experiments/{ids['Haofei01_MR1']}"
    assert row["URI"].startswith(prefix + "/scans/99/resources/")
    assert row["URI"].endswith("/files/phoenix_report.txt")
    assert get(admin, demo_sandbox.url + row["URI"]).status_code == 200


def test_scan_level_file_listing_covers_scans(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    eid = ids["Haofei02_MR1"]
    one = result_set(admin, demo_sandbox.url + f"/data/experiments/{eid}/scans/1/files")
    assert len(one["Result"]) == 3
    listed = result_set(admin, demo_sandbox.url + f"/data/experiments/{eid}/scans/ALL/files")
    assert len(listed["Result"]) == 3 + 12 + 8 + 1
    two = result_set(admin, demo_sandbox.url + f"/data/experiments/{eid}/scans/1,99/files")
    assert sorted({r["URI"].split("/scans/")[1].split("/")[0] for r in two["Result"]}) == [
        "1",
        "99",
    ]


# -- items ---------------------------------------------------------------------------------
def item(http: requests.Session, url: str) -> dict[str, Any]:
    resp = get(http, url, format="json")
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    items = resp.json()["items"]
    assert len(items) == 1
    return items[0]


def test_experiment_item_json(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    eid, sid = ids["Haofei01_MR1"], ids["Haofei01"]
    paths = [
        f"/data/experiments/{eid}",
        "/data/projects/PTV000/experiments/Haofei01_MR1",
        f"/data/projects/PTV000/experiments/{eid}",
        "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1",
        f"/data/archive/projects/PTV000/subjects/{sid}/experiments/{eid}",
    ]
    for path in paths:
        doc = item(admin, demo_sandbox.url + path)
        assert doc["meta"]["xsi:type"] == "xnat:mrSessionData"
        assert doc["meta"]["isHistory"] is False
        fields = doc["data_fields"]
        assert fields["ID"] == eid and fields["label"] == "Haofei01_MR1"
        assert fields["project"] == "PTV000" and fields["subject_ID"] == sid
        assert fields["date"] == "2024-01-02"
        scans = [c for c in doc["children"] if c["field"] == "scans/scan"]
        assert len(scans) == 1
        scan_items = scans[0]["items"]
        assert [s["data_fields"]["ID"] for s in scan_items] == ["1", "4", "5", "99"]
        assert {s["meta"]["xsi:type"] for s in scan_items} == {"xnat:mrScanData"}
        # item JSON keeps native types, unlike listings
        assert isinstance(scan_items[0]["data_fields"]["xnat_imagescandata_id"], int)


def test_subject_and_project_items(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    sid = ids["Haofei03"]
    for path in (
        f"/data/subjects/{sid}",
        "/data/projects/PTV000/subjects/Haofei03",
        f"/data/projects/PTV000/subjects/{sid}",
    ):
        doc = item(admin, demo_sandbox.url + path)
        assert doc["meta"]["xsi:type"] == "xnat:subjectData"
        assert doc["data_fields"]["ID"] == sid and doc["data_fields"]["label"] == "Haofei03"
        assert doc["data_fields"]["project"] == "PTV000"
    project = item(admin, demo_sandbox.url + "/data/projects/PTV000")
    assert project["meta"]["xsi:type"] == "xnat:projectData"
    assert project["data_fields"]["ID"] == "PTV000"


def test_item_lookup_errors(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    # /data/experiments/{e} takes the accession ID only
    resp = get(admin, demo_sandbox.url + "/data/experiments/Haofei01_MR1", format="json")
    assert resp.status_code == 404
    assert "Unable to find the specified experiment." in resp.text
    resp = get(
        admin, demo_sandbox.url + "/data/projects/PTV000/experiments/Nope_MR9", format="json"
    )
    assert resp.status_code == 404
    # an experiment of another subject is not found under this subject
    resp = get(
        admin,
        demo_sandbox.url + "/data/projects/PTV000/subjects/Haofei02/experiments/Haofei01_MR1",
        format="json",
    )
    assert resp.status_code == 404
    assert (
        get(admin, demo_sandbox.url + "/data/subjects/Haofei01", format="json").status_code == 404
    )
    eid = ids["Haofei01_MR1"]
    assert get(admin, demo_sandbox.url + f"/data/experiments/{eid}/scans/42").status_code == 404


def test_project_experiment_scans_path_is_the_experiment(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    """XNAT has no /projects/{p}/experiments/{e}/scans route; prefix routing gives the session."""
    doc = item(admin, demo_sandbox.url + "/data/projects/PTV000/experiments/Haofei01_MR1/scans")
    assert doc["meta"]["xsi:type"] == "xnat:mrSessionData"
    assert doc["data_fields"]["ID"] == ids["Haofei01_MR1"]


def test_scans_addressed_by_id_type_list_and_all(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    base = demo_sandbox.url + f"/data/experiments/{ids['Haofei01_MR1']}/scans"
    assert item(admin, base + "/4")["data_fields"]["type"] == "Ax 3D T1"
    by_type = item(admin, base + "/Localizer")
    assert by_type["data_fields"]["ID"] == "1"
    assert by_type["meta"]["xsi:type"] == "xnat:mrScanData"

    def scan_ids(spec: str) -> list[str]:
        rows = result_set(admin, base + f"/{spec}/resources")["Result"]
        return sorted(r["cat_id"] for r in rows)

    assert scan_ids("1,4") == ["1", "4"]
    assert scan_ids("Localizer,PhoenixZIPReport") == ["1", "99"]
    assert scan_ids("ALL") == ["1", "4", "5", "99"]
    assert scan_ids("ep2d bold (rest)") == ["5"]


def test_resource_without_files_is_catalog_xml(
    demo_sandbox: SandboxServer, admin: requests.Session, ids: dict[str, str]
) -> None:
    base = demo_sandbox.url + f"/data/experiments/{ids['Haofei01_MR1']}/scans/99/resources"
    rid = result_set(admin, base)["Result"][0]["xnat_abstractresource_id"]
    for ref in ("DICOM", rid):
        resp = get(admin, f"{base}/{ref}", format="json")
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/xml")
        assert resp.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog')
        assert "phoenix_report.txt" in resp.text
    resp = get(admin, base + "/NIFTI", format="json")
    assert resp.status_code == 404
    assert "Unable to find the specified catalog." in resp.text
