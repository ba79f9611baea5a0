"""Uploads and deletes on the sandbox over real HTTP (xnat-api.md 4.2-4.4).

Every test writes, so each gets a fresh seeded ``sandbox`` of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

T = 10
SESSION = "/data/projects/PTV000/subjects/Haofei01/experiments/Haofei01_MR1"


@pytest.fixture()
def http(sandbox: SandboxServer) -> Iterator[requests.Session]:
    """Basic auth once; the JSESSIONID cookie carries the rest."""
    with requests.Session() as session:
        session.auth = (sandbox.user, sandbox.password)
        yield session


def files(http: requests.Session, url: str) -> dict[str, dict[str, str]]:
    """The file listing at ``url``, keyed by path relative to the resource."""
    resp = http.get(url, params={"format": "json"}, timeout=T)
    assert resp.status_code == 200, resp.text[:300]
    return {row["URI"].split("/files/", 1)[1]: row for row in resp.json()["ResultSet"]["Result"]}


def resources(http: requests.Session, url: str) -> dict[str, dict[str, str]]:
    resp = http.get(url, params={"format": "json"}, timeout=T)
    assert resp.status_code == 200
    return {row["label"]: row for row in resp.json()["ResultSet"]["Result"]}


def on_disk(server: SandboxServer, data: bytes) -> list[Path]:
    """Files under the archive folder whose bytes are ``data``."""
    root = server.data_dir / "archive"
    return [p for p in root.rglob("*") if p.is_file() and p.read_bytes() == data]


def assert_stored(
    http: requests.Session, server: SandboxServer, res_url: str, path: str, data: bytes
) -> None:
    row = files(http, res_url + "/files")[path]
    assert row["Size"] == str(len(data))
    assert row["digest"] == hashlib.md5(data).hexdigest()
    got = http.get(server.url + row["URI"], timeout=T)
    assert got.status_code == 200 and got.content == data


def test_raw_body_with_inbody(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/NOTES"
    data = b"inbody upload\n"
    resp = http.put(
        res + "/files/notes.csv",
        params={"inbody": "true"},
        data=data,
        headers={"Content-Type": "text/csv"},
        timeout=T,
    )
    assert resp.status_code == 200 and resp.content == b""
    assert_stored(http, sandbox, res, "notes.csv", data)
    # the resource label did not exist: the upload created it
    created = resources(http, sandbox.url + SESSION + "/resources")["NOTES"]
    assert created["file_count"] == "1" and created["element_name"] == "xnat:resourceCatalog"


def test_raw_octet_stream_without_inbody(sandbox: SandboxServer, http: requests.Session) -> None:
    """What xnatpy sends: PUT, Content-Type application/octet-stream, bytes as the body."""
    res = sandbox.url + SESSION + "/scans/4/resources/NIFTI"
    data = bytes(range(256)) * 40
    resp = http.put(
        res + "/files/t1.nii",
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=T,
    )
    assert resp.status_code == 200
    assert_stored(http, sandbox, res, "t1.nii", data)
    row = resources(http, sandbox.url + SESSION + "/scans/4/resources")["NIFTI"]
    assert row["cat_id"] == "4" and row["file_size"] == str(len(data))


def test_multipart_with_and_without_path(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/MP"
    # with a path in the URL, the URL names the stored file, not the part's filename
    resp = http.put(
        res + "/files/named/by_url.txt",
        files={"file": ("ignored.txt", b"first", "text/plain")},
        timeout=T,
    )
    assert resp.status_code == 200
    # without a path, the part's filename is used
    resp = http.post(
        res + "/files", files={"file": ("from_part.txt", b"second", "text/plain")}, timeout=T
    )
    assert resp.status_code == 200
    listed = files(http, res + "/files")
    assert set(listed) == {"named/by_url.txt", "from_part.txt"}
    assert_stored(http, sandbox, res, "from_part.txt", b"second")
    assert_stored(http, sandbox, res, "named/by_url.txt", b"first")


def test_empty_body_is_refused(sandbox: SandboxServer, http: requests.Session) -> None:
    url = sandbox.url + SESSION + "/scans/1/resources/DICOM/files/empty.txt"
    resp = http.put(url, params={"inbody": "true"}, data=b"", timeout=T)
    assert resp.status_code == 400
    assert "didn't provide any data" in resp.text
    assert "empty.txt" not in files(http, sandbox.url + SESSION + "/scans/1/resources/DICOM/files")


def test_failed_upload_leaves_no_new_resource(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    """A resource auto-created by an upload that is then refused must not be left behind."""
    url = sandbox.url + SESSION + "/scans/1/resources/NEWRES/files/empty.txt"
    resp = http.put(url, params={"inbody": "true"}, data=b"", timeout=T)
    assert resp.status_code == 400
    assert "NEWRES" not in resources(http, sandbox.url + SESSION + "/scans/1/resources")


def test_sub_folders(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/TREE"
    for path, data in (
        ("sub/dir/x.txt", b"x"),
        ("sub/dir/y.txt", b"y"),
        ("sub/z.txt", b"z"),
        ("top.txt", b"t"),
    ):
        resp = http.put(f"{res}/files/{path}", params={"inbody": "true"}, data=data, timeout=T)
        assert resp.status_code == 200
    assert set(files(http, res + "/files")) == {
        "sub/dir/x.txt",
        "sub/dir/y.txt",
        "sub/z.txt",
        "top.txt",
    }
    assert set(files(http, res + "/files/sub/")) == {"sub/dir/x.txt", "sub/dir/y.txt", "sub/z.txt"}
    assert set(files(http, res + "/files/sub/dir/")) == {"sub/dir/x.txt", "sub/dir/y.txt"}
    row = files(http, res + "/files")["sub/dir/x.txt"]
    assert row["Name"] == "x.txt"
    assert http.get(sandbox.url + row["URI"], timeout=T).content == b"x"


def test_duplicate_without_overwrite_keeps_old_content(
    sandbox: SandboxServer, http: requests.Session
) -> None:
    res = sandbox.url + SESSION + "/resources/DUP"
    raw = {"Content-Type": "application/octet-stream"}
    assert http.put(res + "/files/x.txt", data=b"old", headers=raw, timeout=T).status_code == 200
    again = http.put(
        res + "/files/x.txt",
        data=b"new content",
        timeout=T,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert again.status_code == 200  # not a 409
    assert json.loads(again.text) == {"duplicates": ["x.txt"]}
    assert_stored(http, sandbox, res, "x.txt", b"old")
    replaced = http.put(
        res + "/files/x.txt",
        params={"overwrite": "true"},
        data=b"new content",
        headers={"Content-Type": "application/octet-stream"},
        timeout=T,
    )
    assert replaced.status_code == 200 and "duplicates" not in replaced.text
    assert_stored(http, sandbox, res, "x.txt", b"new content")
    assert on_disk(sandbox, b"old") == []


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _targz(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_zip_and_targz(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/EXTRACTED"
    archive = _zip({"mr_1/1.dcm": b"one", "mr_1/2.dcm": b"two"})
    # the folder part of the URL is ignored: entries land in the resource root
    resp = http.put(
        res + "/files/ignored/upload.zip",
        params={"extract": "true"},
        data=archive,
        headers={"Content-Type": "application/zip"},
        timeout=T,
    )
    assert resp.status_code == 200
    resp = http.post(
        res + "/files",
        params={"extract": "true"},
        files={"file": ("upload.tar.gz", _targz({"tar/3.txt": b"three"}), "application/gzip")},
        timeout=T,
    )
    assert resp.status_code == 200
    assert set(files(http, res + "/files")) == {"mr_1/1.dcm", "mr_1/2.dcm", "tar/3.txt"}
    assert_stored(http, sandbox, res, "mr_1/2.dcm", b"two")
    assert_stored(http, sandbox, res, "tar/3.txt", b"three")
    # without extract=true an archive is stored as a file
    resp = http.put(
        res + "/files/kept.zip",
        data=archive,
        headers={"Content-Type": "application/zip"},
        timeout=T,
    )
    assert resp.status_code == 200
    assert_stored(http, sandbox, res, "kept.zip", archive)


def test_extract_refuses_escaping_entries(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/EVIL"
    for name, archive in (
        ("evil.zip", _zip({"good.txt": b"good", "../../escape.txt": b"evil"})),
        ("evil.tar.gz", _targz({"good.txt": b"good", "../escape.txt": b"evil"})),
    ):
        resp = http.put(
            f"{res}/files/{name}",
            params={"extract": "true", "inbody": "true"},
            data=archive,
            timeout=T,
        )
        assert resp.status_code == 400, name
        listed = http.get(res + "/files", params={"format": "json"}, timeout=T)
        rows = listed.json()["ResultSet"]["Result"] if listed.status_code == 200 else []
        assert rows == [], name  # not even the harmless entry
    assert on_disk(sandbox, b"evil") == [] and on_disk(sandbox, b"good") == []
    assert not list(sandbox.data_dir.rglob("escape.txt"))


def test_chunked_request_body(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/scans/5/resources/CHUNKED"
    parts = [bytes([n]) * 70_000 for n in range(5)]

    def body() -> Iterator[bytes]:
        yield from parts

    resp = http.put(
        res + "/files/big.bin",
        data=body(),
        timeout=T,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert resp.status_code == 200
    assert_stored(http, sandbox, res, "big.bin", b"".join(parts))


def test_assessor_in_and_out_resources(sandbox: SandboxServer, http: requests.Session) -> None:
    session = sandbox.url + SESSION
    resp = http.put(
        session + "/assessors/QC1", params={"xsiType": "xnat:qcAssessmentData"}, timeout=T
    )
    assert resp.status_code == 201
    aid = resp.text.strip()
    assessor = f"{session}/assessors/{aid}"
    inbody = {"inbody": "true"}
    for inout in ("out", "in"):
        resp = http.put(
            f"{assessor}/{inout}/resources/R/files/f.txt",
            params=inbody,
            data=inout.encode(),
            timeout=T,
        )
        assert resp.status_code == 200
    # no in/out segment means out
    assert http.get(assessor + "/resources/R/files/f.txt", timeout=T).content == b"out"
    assert (
        http.get(session + "/assessors/QC1/in/resources/R/files/f.txt", timeout=T).content == b"in"
    )
    row = files(http, assessor + "/out/resources/R/files")["f.txt"]
    assert "/assessors/" in row["URI"] and "/out/resources/" in row["URI"]
    assert http.get(sandbox.url + row["URI"], timeout=T).content == b"out"
    out_rows = resources(http, assessor + "/out/resources")
    assert out_rows["R"]["category"] == "assessors"


# -- deletes -----------------------------------------------------------------------------------
def _upload_tree(http: requests.Session, res: str, names: list[str]) -> None:
    for name in names:
        resp = http.put(
            f"{res}/files/{name}",
            params={"inbody": "true"},
            data=f"bytes of {name}".encode(),
            timeout=T,
        )
        assert resp.status_code == 200


def test_delete_file_folder_and_wildcard(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/resources/DEL"
    _upload_tree(
        http,
        res,
        ["a1.txt", "a2.txt", "b.txt", "sub/folder/c.txt", "sub/folder/d.txt", "sub/e.txt"],
    )
    assert http.delete(res + "/files/b.txt", timeout=T).status_code == 200
    assert "b.txt" not in files(http, res + "/files")
    assert on_disk(sandbox, b"bytes of b.txt") == []
    assert http.delete(res + "/files/sub/folder", timeout=T).status_code == 200
    assert set(files(http, res + "/files")) == {"a1.txt", "a2.txt", "sub/e.txt"}
    assert on_disk(sandbox, b"bytes of sub/folder/c.txt") == []
    assert http.delete(res + "/files/a*", timeout=T).status_code == 200
    assert set(files(http, res + "/files")) == {"sub/e.txt"}
    assert on_disk(sandbox, b"bytes of a1.txt") == [] and on_disk(sandbox, b"bytes of a2.txt") == []
    assert len(on_disk(sandbox, b"bytes of sub/e.txt")) == 1

    missing = http.delete(res + "/files/nothing*", timeout=T)
    assert missing.status_code == 404 and "No matched files" in missing.text
    quiet = http.delete(res + "/files/nothing.txt", params={"accept-not-found": "true"}, timeout=T)
    assert quiet.status_code == 204


def test_delete_resource(sandbox: SandboxServer, http: requests.Session) -> None:
    res = sandbox.url + SESSION + "/scans/1/resources/GONE"
    _upload_tree(http, res, ["g.txt"])
    assert len(on_disk(sandbox, b"bytes of g.txt")) == 1
    assert http.delete(res, timeout=T).status_code == 200
    assert "GONE" not in resources(http, sandbox.url + SESSION + "/scans/1/resources")
    assert on_disk(sandbox, b"bytes of g.txt") == []
    assert http.get(res + "/files", timeout=T).status_code == 404
    # the scan's other resource is untouched
    assert len(files(http, sandbox.url + SESSION + "/scans/1/resources/DICOM/files")) == 3


def test_delete_scan_and_experiment(sandbox: SandboxServer, http: requests.Session) -> None:
    session = sandbox.url + SESSION
    report = http.get(session + "/scans/99/resources/DICOM/files/phoenix_report.txt", timeout=T)
    assert report.status_code == 200 and len(on_disk(sandbox, report.content)) == 1
    assert (
        http.delete(session + "/scans/99", params={"removeFiles": "true"}, timeout=T).status_code
        == 200
    )
    scans = http.get(session + "/scans", params={"format": "json"}, timeout=T).json()
    assert [r["ID"] for r in scan_rows(scans)] == ["1", "4", "5"]
    assert on_disk(sandbox, report.content) == []

    dcm = http.get(session + "/scans/4/resources/DICOM/files/0001.dcm", timeout=T).content
    assert len(on_disk(sandbox, dcm)) == 1
    assert http.delete(session, params={"removeFiles": "true"}, timeout=T).status_code == 200
    assert http.get(session, params={"format": "json"}, timeout=T).status_code == 404
    listed = http.get(
        sandbox.url + "/data/projects/PTV000/experiments", params={"format": "json"}, timeout=T
    ).json()
    assert sorted(r["label"] for r in scan_rows(listed)) == ["Haofei02_MR1", "Haofei03_MR1"]
    assert on_disk(sandbox, dcm) == []


def scan_rows(doc: dict[str, dict[str, list[dict[str, str]]]]) -> list[dict[str, str]]:
    return doc["ResultSet"]["Result"]
