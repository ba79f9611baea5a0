"""``hpcbridge stage-out`` against a sandbox over loopback: uploads that XNAT's listing proves.

Every test writes to XNAT, so each gets a fresh seeded ``sandbox`` of its own.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests_mock
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.credentials import Secret
from hpcbridge.sandbox import SandboxServer
from hpcbridge.stageout import collect, resolve_target, stage_out
from hpcbridge.units import human_size
from hpcbridge.xnat import Address
from hpcbridge.xnat.client import XnatClient

T = 10
EXP = "/data/experiments/XNAT_E00001"  # Haofei01_MR1
SCAN4 = "PTV000/Haofei01/Haofei01_MR1/4"
NIFTI = f"{EXP}/scans/4/resources/NIFTI"


@pytest.fixture()
def env(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    return sandbox


@pytest.fixture()
def http(sandbox: SandboxServer) -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = (sandbox.user, sandbox.password)
        yield session


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request hpcbridge hands to requests: method, path, params, body type."""
    calls: list[dict[str, Any]] = []
    real = requests.Session.request

    def spy(self: requests.Session, method: str, url: str, **kwargs: Any) -> Any:
        calls.append(
            {
                "method": method,
                "path": url.split("://", 1)[1].split("/", 1)[1],
                "params": dict(kwargs.get("params") or {}),
                "content_type": (kwargs.get("headers") or {}).get("Content-Type"),
                "data": type(kwargs.get("data")),
                "readable": hasattr(kwargs.get("data"), "read"),
            }
        )
        return real(self, method, url, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    return calls


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def listing(http: requests.Session, server: SandboxServer, url: str) -> dict[str, dict[str, str]]:
    """File rows by path inside the resource at ``url``."""
    resp = http.get(server.url + url + "/files", params={"format": "json"}, timeout=T)
    assert resp.status_code == 200, resp.text[:200]
    return {r["URI"].split("/files/", 1)[1]: r for r in resp.json()["ResultSet"]["Result"]}


def content(http: requests.Session, server: SandboxServer, url: str, name: str) -> bytes:
    resp = http.get(f"{server.url}{url}/files/{name}", timeout=T)
    assert resp.status_code == 200
    return resp.content


def puts(http: requests.Session, server: SandboxServer) -> int:
    stats = http.get(server.url + "/sandbox/stats", timeout=T).json()
    return int(stats["requests"].get("PUT", 0))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_listed(rows: dict[str, dict[str, str]], folder: Path) -> None:
    """Every file under ``folder`` is listed with its size and md5, and nothing else is."""
    local = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert set(rows) == set(local)
    for name, data in local.items():
        assert rows[name]["Size"] == str(len(data)), name
        assert rows[name]["digest"] == md5(data), name


# -- the Artemis example ---------------------------------------------------------------------------
def test_artemis_round_trip_stage_in_convert_stage_out_and_rerun(
    env: SandboxServer, http: requests.Session, tmp_path: Path
) -> None:
    assert run("stage-in", SCAN4, "--dest", str(tmp_path / "in")).exit_code == 0
    dicoms = sorted((tmp_path / "in/Haofei01_MR1/scans/4-Ax_3D_T1/resources/DICOM/files").iterdir())
    out = tmp_path / "out"
    out.mkdir()  # what dcm2niix -z y would leave: an image and its sidecar
    (out / "Ax_3D_T1_4.nii.gz").write_bytes(gzip.compress(b"".join(p.read_bytes() for p in dicoms)))
    (out / "Ax_3D_T1_4.json").write_text(json.dumps({"SeriesDescription": "Ax 3D T1"}))

    result = run("stage-out", SCAN4, "--resource", "NIFTI", str(out))
    assert result.exit_code == 0, result.output
    size = sum(p.stat().st_size for p in out.iterdir())
    assert result.stdout == (
        f"{SCAN4} resource NIFTI: uploaded 2 file(s) ({human_size(size)}), skipped 0 "
        "identical; verified against XNAT's listing\n"
    )
    rows = listing(http, env, NIFTI)
    assert_listed(rows, out)
    nii, sidecar = rows["Ax_3D_T1_4.nii.gz"], rows["Ax_3D_T1_4.json"]
    assert (nii["file_format"], nii["file_content"]) == ("NIFTI", "IMAGE")
    assert (sidecar["file_format"], sidecar["file_content"]) == ("JSON", "BIDS_SIDECAR")
    assert (
        content(http, env, NIFTI, "Ax_3D_T1_4.nii.gz") == (out / "Ax_3D_T1_4.nii.gz").read_bytes()
    )
    resources = http.get(
        f"{env.url}{EXP}/scans/4/resources", params={"format": "json"}, timeout=T
    ).json()["ResultSet"]["Result"]
    made = next(r for r in resources if r["label"] == "NIFTI")
    assert (made["format"], made["content"], made["file_count"]) == ("NIFTI", "NIFTI_RAW", "2")

    before = puts(http, env)
    again = run("--json", "stage-out", SCAN4, "--resource", "NIFTI", str(out))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {
        "target": f"{SCAN4} resource NIFTI",
        "uploaded": [],
        "skipped": ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz"],
        "bytes": 0,
        "created_resource": False,
        "verified": True,
    }
    assert puts(http, env) == before  # nothing sent at all


# -- what goes up and how --------------------------------------------------------------------------
def test_sub_folders_are_kept_and_bodies_are_streamed_file_objects(
    env: SandboxServer, http: requests.Session, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    out = tmp_path / "out"
    (out / "anat").mkdir(parents=True)
    (out / "func" / "run-1").mkdir(parents=True)
    (out / "anat" / "T1w.nii.gz").write_bytes(gzip.compress(b"t1" * 5000))
    (out / "func" / "run-1" / "bold.nii.gz").write_bytes(gzip.compress(b"bold" * 5000))
    (out / "dataset_description.json").write_text('{"Name": "x"}')
    result = run("stage-out", SCAN4, "--resource", "BIDS", str(out))
    assert result.exit_code == 0, result.output
    rows = listing(http, env, f"{EXP}/scans/4/resources/BIDS")
    assert set(rows) == {"anat/T1w.nii.gz", "func/run-1/bold.nii.gz", "dataset_description.json"}
    assert_listed(rows, out)

    uploads = [c for c in sent if c["method"] == "PUT" and "/files/" in c["path"]]
    assert len(uploads) == 3
    for call in uploads:
        assert call["readable"] and call["data"] not in (bytes, bytearray, str), call
        assert call["params"]["inbody"] == "true"
        assert call["content_type"] == "application/octet-stream"


def test_many_small_files_go_up_as_one_zip_that_xnat_unpacks(
    env: SandboxServer, http: requests.Session, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for i in range(10):
        (out / ("sub" if i % 3 == 0 else ".") / f"slice_{i:02d}.txt").write_text(f"slice {i}\n" * i)
    before = puts(http, env)
    result = run("stage-out", SCAN4, "--resource", "QC", str(out))
    assert result.exit_code == 0, result.output
    assert "uploaded 10 file(s)" in result.stdout
    assert puts(http, env) - before == 2  # the resource, then one zip
    [upload] = [c for c in sent if c["method"] == "PUT" and "/files/" in c["path"]]
    assert upload["content_type"] == "application/zip" and upload["readable"]
    assert upload["params"]["extract"] == "true"
    rows = listing(http, env, f"{EXP}/scans/4/resources/QC")
    assert_listed(rows, out)  # unpacked, sub-folder kept, the zip itself not kept


def test_zipped_dcm2niix_outputs_keep_their_labels(
    env: SandboxServer, http: requests.Session, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    """Eight series of NIfTI + sidecar: one zip per kind, so each file keeps its labels."""
    out = tmp_path / "out"
    out.mkdir()
    for i in range(8):
        (out / f"run{i}.nii.gz").write_bytes(gzip.compress(b"nifti" * (i + 1)))
        (out / f"run{i}.json").write_text(json.dumps({"SeriesNumber": i}))
    result = run("stage-out", SCAN4, "--resource", "NIFTI", str(out))
    assert result.exit_code == 0, result.output
    zips = [c for c in sent if c["method"] == "PUT" and c["params"].get("extract") == "true"]
    assert sorted(c["params"]["format"] for c in zips) == ["JSON", "NIFTI"]
    rows = listing(http, env, NIFTI)
    assert_listed(rows, out)
    for name, row in rows.items():
        want = ("NIFTI", "IMAGE") if name.endswith(".nii.gz") else ("JSON", "BIDS_SIDECAR")
        assert (row["file_format"], row["file_content"]) == want, name


def test_an_existing_file_without_digest_is_not_guessed_identical(
    env: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older archives list no md5: the same size proves nothing, so it is refused, not skipped."""
    from hpcbridge.stageout import upload as stageout
    from hpcbridge.xnat.model import FileEntry

    out = tmp_path / "out"
    out.mkdir()
    (out / "sub.json").write_text("{}")
    listed = {"sub.json": FileEntry("sub.json", "sub.json", 2, "", "/data/x/files/sub.json")}
    monkeypatch.setattr(stageout, "remote_files", lambda client, target: listed)
    result = CliRunner().invoke(main, ["stage-out", SCAN4, "--resource", "NIFTI", str(out)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4} resource NIFTI: sub.json already exist(s) in XNAT without a "
        "digest, so hpcbridge cannot tell whether they are identical; nothing was uploaded "
        "(add --overwrite to replace them)\n"
    )


def test_no_zip_uploads_small_files_one_by_one(
    env: SandboxServer, http: requests.Session, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for i in range(9):
        (out / f"slice_{i}.txt").write_text(f"slice {i}\n")
    before = puts(http, env)
    result = run("stage-out", SCAN4, "--resource", "QC", "--no-zip", str(out))
    assert result.exit_code == 0, result.output
    assert puts(http, env) - before == 1 + 9
    uploads = [c for c in sent if c["method"] == "PUT" and "/files/" in c["path"]]
    assert all(c["content_type"] == "application/octet-stream" for c in uploads)
    assert_listed(listing(http, env, f"{EXP}/scans/4/resources/QC"), out)


# -- refusals and conflicts ------------------------------------------------------------------------
def test_names_with_spaces_are_refused_before_anything_is_sent(
    env: SandboxServer, http: requests.Session, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.json").write_text("{}")
    (out / "my scan.nii.gz").write_bytes(b"x")
    before = puts(http, env)
    result = run("stage-out", SCAN4, "--resource", "NIFTI", str(out))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {out / 'my scan.nii.gz'}: the name 'my scan.nii.gz' has characters "
        "XNAT cannot address reliably (rename it to letters, digits, '.', '_', '-' and '+')\n"
    )
    assert puts(http, env) == before


def test_a_different_file_in_xnat_is_kept_unless_overwrite(
    env: SandboxServer, http: requests.Session, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sidecar = out / "x.json"
    sidecar.write_text('{"EchoTime": 0.01}')
    assert run("stage-out", SCAN4, "--resource", "NIFTI", str(sidecar)).exit_code == 0
    first = sidecar.read_bytes()

    sidecar.write_text('{"EchoTime": 0.02}')
    (out / "x.nii.gz").write_bytes(gzip.compress(b"image" * 100))
    result = run("stage-out", SCAN4, "--resource", "NIFTI", str(out))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4} resource NIFTI: x.json already exist(s) in XNAT with "
        "different content; nothing was uploaded (add --overwrite to replace them)\n"
    )
    assert content(http, env, NIFTI, "x.json") == first
    assert set(listing(http, env, NIFTI)) == {"x.json"}  # the new image did not go up either

    result = run("stage-out", SCAN4, "--resource", "NIFTI", "--overwrite", str(out))
    assert result.exit_code == 0, result.output
    assert "uploaded 2 file(s)" in result.stdout and "verified" in result.stdout
    assert content(http, env, NIFTI, "x.json") == sidecar.read_bytes()
    assert_listed(listing(http, env, NIFTI), out)


def test_an_unknown_scan_is_not_found(env: SandboxServer, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    result = run(
        "stage-out", "PTV000/Haofei01/Haofei01_MR1/77", "--resource", "NIFTI", str(tmp_path)
    )
    assert result.exit_code == 1
    assert result.stderr == (
        "hpcbridge: error: not found: PTV000/Haofei01/Haofei01_MR1/77 "
        "(no scan '77' in PTV000/Haofei01/Haofei01_MR1) "
        "(`hpcbridge ls PTV000/Haofei01/Haofei01_MR1` lists what is there)\n"
    )


def test_an_upload_xnat_accepts_but_does_not_store_is_an_error(
    env: SandboxServer, http: requests.Session, tmp_path: Path
) -> None:
    """As for a read-only user on a real XNAT: 200 to the PUT, and nothing in the listing."""
    image = tmp_path / "x.nii.gz"
    image.write_bytes(gzip.compress(b"image" * 100))
    with requests_mock.Mocker(real_http=True) as mock:
        mock.put(re.compile(r"/resources/NIFTI/files/"), status_code=200, text="")
        result = run("stage-out", SCAN4, "--resource", "NIFTI", str(image))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4} resource NIFTI: x.nii.gz did not arrive (XNAT answered "
        "but does not list it; check your write access to the project)\n"
    )
    assert listing(http, env, NIFTI) == {}


# -- assessors -------------------------------------------------------------------------------------
def test_assessor_out_and_in_resources(
    env: SandboxServer, http: requests.Session, tmp_path: Path
) -> None:
    resp = http.put(
        f"{env.url}{EXP}/assessors/QC1",
        params={"xsiType": "xnat:qcManualAssessorData"},
        timeout=T,
    )
    assert resp.status_code in (200, 201), resp.text
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 fake report")
    settings = tmp_path / "settings.json"
    settings.write_text('{"threshold": 3}')
    session = "PTV000/Haofei01/Haofei01_MR1"

    result = run("stage-out", session, "--assessor", "QC1", "--resource", "PDF", str(report))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(
        f"{session} assessor QC1 (out) resource PDF: uploaded 1 file(s)"
    )
    args = ("--assessor", "QC1", "--inout", "in", "--resource", "SETTINGS", str(settings))
    assert run("stage-out", session, *args).exit_code == 0

    out_rows = listing(http, env, f"{EXP}/assessors/QC1/out/resources/PDF")
    assert out_rows["report.pdf"]["digest"] == md5(report.read_bytes())
    in_rows = listing(http, env, f"{EXP}/assessors/QC1/in/resources/SETTINGS")
    assert in_rows["settings.json"]["digest"] == md5(settings.read_bytes())

    result = run("stage-out", session, "--assessor", "QC9", "--resource", "PDF", str(report))
    assert result.exit_code == 1
    assert result.stderr == f"hpcbridge: error: not found: assessor QC9 of {session}\n"


# -- the library -----------------------------------------------------------------------------------
def test_the_library_plans_uploads_and_skips_identical_files(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("{}")
    (out / "b.bval").write_text("0 1000\n")
    creds = Secret(sandbox.user, sandbox.password, "environment")
    with XnatClient(sandbox.url, creds) as client:
        target = resolve_target(client, Address.parse(SCAN4), "DWI")
        files = collect([out])
        first = stage_out(client, target, files)
        second = stage_out(client, target, collect([out]))
    assert (first.uploaded, first.created_resource) == (["a.json", "b.bval"], True)
    assert (second.uploaded, second.skipped) == ([], ["a.json", "b.bval"])
    assert target.files_url == f"{EXP}/scans/4/resources/DWI/files"


def test_a_digest_that_differs_after_upload_is_an_error_naming_the_file(
    env: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The md5 computed while sending must match what XNAT lists afterwards."""
    from hpcbridge.stageout import upload as stageout
    from hpcbridge.xnat.model import FileEntry

    out = tmp_path / "out"
    out.mkdir()
    (out / "sub.nii.gz").write_bytes(gzip.compress(b"image"))
    size = (out / "sub.nii.gz").stat().st_size
    answers = iter([{}, {"sub.nii.gz": FileEntry("sub.nii.gz", "sub.nii.gz", size, "0" * 32, "")}])
    monkeypatch.setattr(stageout, "remote_files", lambda client, target: next(answers))
    result = CliRunner().invoke(main, ["stage-out", SCAN4, "--resource", "NIFTI", str(out)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4} resource NIFTI: sub.nii.gz has md5 {'0' * 32} in XNAT, "
        f"{md5((out / 'sub.nii.gz').read_bytes())} here\n"
    )
