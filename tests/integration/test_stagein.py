"""``hpcbridge stage-in`` against a sandbox over loopback: layout, manifest, re-runs, failures.

Read-only tests share ``demo_sandbox``; tests that change the archive or inject faults get a
``sandbox`` of their own. Bad archives (garbage, zip-slip, damaged entries) are served by
replacing ``XnatClient.stream`` while the listing still comes from the sandbox.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import zipfile
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

import hpcbridge.stagein as stagein
from hpcbridge.cli import main
from hpcbridge.sandbox import SandboxServer
from hpcbridge.stagein import Selection, stage_in
from hpcbridge.xnat import Address
from hpcbridge.xnat.client import XnatClient

T = 10
EXP = "/data/experiments/XNAT_E00001"  # Haofei01_MR1
SCAN4 = "PTV000/Haofei01/Haofei01_MR1/4"
T1_DIR = Path("Haofei01_MR1/scans/4-Ax_3D_T1/resources/DICOM")
T1_PREFIX = "Haofei01_MR1/scans/4-Ax_3D_T1/resources/DICOM/files/"
T1_BYTES = 42100  # the 12 files of scan 4


def use(server: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    monkeypatch.setenv("HPCBRIDGE_XNAT", server.url)
    monkeypatch.setenv("HPCBRIDGE_USER", server.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", server.password)
    return server


@pytest.fixture()
def shared(demo_sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    """The shared sandbox: stage-in only reads from XNAT."""
    return use(demo_sandbox, monkeypatch)


@pytest.fixture()
def own(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> SandboxServer:
    """A sandbox of this test's own, to change its archive or inject faults."""
    return use(sandbox, monkeypatch)


def admin(server: SandboxServer) -> requests.Session:
    session = requests.Session()
    session.auth = (server.user, server.password)
    return session


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def bytes_out(server: SandboxServer) -> int:
    with admin(server) as session:
        return int(session.get(server.url + "/sandbox/stats", timeout=T).json()["bytes_out"])


def xnat_files(server: SandboxServer, scan: str = "4") -> dict[str, dict[str, Any]]:
    with admin(server) as session:
        resp = session.get(
            f"{server.url}{EXP}/scans/{scan}/resources/DICOM/files",
            params={"format": "json"},
            timeout=T,
        )
    return {r["Name"]: r for r in resp.json()["ResultSet"]["Result"]}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_nothing_half_written(dest: Path) -> None:
    """No files folder without its manifest, no *.part, and no staging leftovers."""
    for files in dest.rglob("files"):
        assert (files.parent / "manifest.json").is_file(), files
    assert not list(dest.rglob("*.part"))
    staging = dest / ".hpcbridge-staging"
    assert not staging.exists() or not any(staging.iterdir())


def nothing_staged(dest: Path) -> bool:
    assert_nothing_half_written(dest)
    return not [p for p in dest.rglob("*") if p.is_file()]


def error_line(result: Result) -> str:
    """The last stderr line, which the CLI contract makes the one error message."""
    return result.stderr.splitlines()[-1]


# -- the Artemis example ---------------------------------------------------------------------------
def test_artemis_scan_4_lands_in_xnat_layout_with_a_manifest(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 0, result.output
    folder = dest / T1_DIR
    assert result.stdout == f"scan 4: 12 files, 41.1 KiB -> {folder}\n"
    names = sorted(p.name for p in (folder / "files").iterdir())
    assert names == [f"{i:04d}.dcm" for i in range(1, 13)]
    assert sorted(p.name for p in dest.iterdir()) == ["Haofei01_MR1"]  # staging folder gone

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["address"] == SCAN4
    assert manifest["experiment"] == {"ID": "XNAT_E00001", "label": "Haofei01_MR1"}
    assert manifest["scan"]["ID"] == "4" and manifest["scan"]["type"] == "Ax 3D T1"
    assert manifest["resource"] == "DICOM"
    listed = xnat_files(shared)
    assert [f["path"] for f in manifest["files"]] == names
    for record in manifest["files"]:
        data = (folder / "files" / record["path"]).read_bytes()
        assert record["size"] == len(data) == int(listed[record["path"]]["Size"])
        assert record["md5"] == md5(data) == listed[record["path"]]["digest"]
    dicom = manifest["dicom"]
    assert dicom["instances"] == 12 and not dicom["mixed_series"] and dicom["non_dicom"] == []
    [series] = dicom["series"]
    assert series["modality"] == "MR" and series["instances"] == 12
    assert series["series_description"] == "Ax 3D T1"
    assert series["manufacturer"] == "hpcbridge-sandbox"
    assert series["series_instance_uid"].startswith("2.25.")


# -- selection -------------------------------------------------------------------------------------
def test_scan_type_glob_selects_the_bold_scan_into_an_xnat_style_folder(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    result = run(
        "stage-in", "PTV000/Haofei01/Haofei01_MR1", "--scan-type", "ep2d*", "--dest", str(dest)
    )
    assert result.exit_code == 0, result.output
    scans = sorted(p.name for p in (dest / "Haofei01_MR1" / "scans").iterdir())
    assert scans == ["5-ep2d_bold__rest_"]
    files = dest / "Haofei01_MR1/scans/5-ep2d_bold__rest_/resources/DICOM/files"
    assert len(list(files.iterdir())) == 8


def test_series_globs_and_several_scans_in_one_call_with_json_and_workers(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    result = run(
        "--json",
        "stage-in",
        "PTV000/Haofei01/Haofei01_MR1",
        "--series",
        "Local*",
        "--scan",
        "4",
        "--scan",
        "5",
        "--workers",
        "3",
        "--dest",
        str(dest),
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["scan"], r["status"], r["files"], r["dicom_instances"]) for r in rows] == [
        ("1", "staged", 3, 3),
        ("4", "staged", 12, 12),
        ("5", "staged", 8, 8),
    ]
    assert set(rows[0]) == {"scan", "type", "status", "folder", "files", "bytes", "dicom_instances"}
    assert rows[1] == {
        "scan": "4",
        "type": "Ax 3D T1",
        "status": "staged",
        "folder": str(dest / T1_DIR),
        "files": 12,
        "bytes": T1_BYTES,
        "dicom_instances": 12,
    }
    assert rows[2]["folder"].endswith("/scans/5-ep2d_bold__rest_/resources/DICOM")
    assert all((Path(r["folder"]) / "manifest.json").is_file() for r in rows)


def test_some_scans_failing_exits_3_and_names_each(shared: SandboxServer, tmp_path: Path) -> None:
    dest = tmp_path / "in"
    args = ["PTV000/Haofei01/Haofei01_MR1", "--scan", "1", "--scan", "99", "--dest", str(dest)]
    result = run("--json", "stage-in", *args)
    assert result.exit_code == 3
    rows = json.loads(result.stdout)
    assert [(r["scan"], r["status"]) for r in rows] == [("1", "staged"), ("99", "failed")]
    assert rows[1]["error"] == (
        "PTV000/Haofei01/Haofei01_MR1/99: resource DICOM holds no DICOM (1 other file(s))"
    )
    assert result.stderr == "hpcbridge: error: 1 of 2 scans failed\n"
    assert_nothing_half_written(dest)


def test_a_selection_matching_nothing_names_the_scans_there(
    shared: SandboxServer, tmp_path: Path
) -> None:
    result = run(
        "stage-in", "PTV000/Haofei01/Haofei01_MR1", "--scan-type", "DWI*", "--dest", str(tmp_path)
    )
    assert result.exit_code == 1
    assert result.stderr == (
        "hpcbridge: error: no scan of PTV000/Haofei01/Haofei01_MR1 matches the selection "
        "(scans there: 1, 4, 5, 99)\n"
    )


def test_an_unknown_scan_is_not_found(shared: SandboxServer, tmp_path: Path) -> None:
    result = run("stage-in", "PTV000/Haofei01/Haofei01_MR1/77", "--dest", str(tmp_path / "in"))
    assert result.exit_code == 1
    assert result.stderr == (
        "hpcbridge: error: not found: PTV000/Haofei01/Haofei01_MR1/77 "
        "(no scan '77' in PTV000/Haofei01/Haofei01_MR1) "
        "(`hpcbridge ls PTV000/Haofei01/Haofei01_MR1` lists what is there)\n"
    )


# -- re-runs ---------------------------------------------------------------------------------------
def test_a_rerun_skips_a_verified_scan_without_downloading(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    assert run("stage-in", SCAN4, "--dest", str(dest)).exit_code == 0
    manifest = (dest / T1_DIR / "manifest.json").read_bytes()
    before = bytes_out(shared)
    result = run("stage-in", SCAN4, "--dest", str(dest))
    moved = bytes_out(shared) - before
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(" (already staged, unchanged)\n")
    assert moved < T1_BYTES // 4  # the listing only, not the 41 KiB zip
    assert (dest / T1_DIR / "manifest.json").read_bytes() == manifest  # not rewritten


def test_a_tampered_local_file_is_downloaded_again(shared: SandboxServer, tmp_path: Path) -> None:
    dest = tmp_path / "in"
    assert run("stage-in", SCAN4, "--dest", str(dest)).exit_code == 0
    victim = dest / T1_DIR / "files" / "0007.dcm"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0x01  # same size, one bit different
    victim.write_bytes(bytes(bad))
    before = bytes_out(shared)
    rows = json.loads(run("--json", "stage-in", SCAN4, "--dest", str(dest)).stdout)
    assert rows[0]["status"] == "staged"
    assert bytes_out(shared) - before > T1_BYTES  # the whole zip came again
    assert victim.read_bytes() == good
    assert_nothing_half_written(dest)


def test_a_file_changed_in_xnat_is_downloaded_again(own: SandboxServer, tmp_path: Path) -> None:
    dest = tmp_path / "in"
    assert run("stage-in", SCAN4, "--dest", str(dest)).exit_code == 0
    local = dest / T1_DIR / "files" / "0003.dcm"
    changed = bytearray(local.read_bytes())
    changed[-1] ^= 0xFF  # a pixel of the last row: still a valid DICOM file
    with admin(own) as session:
        resp = session.put(
            f"{own.url}{EXP}/scans/4/resources/DICOM/files/0003.dcm",
            params={"inbody": "true", "overwrite": "true"},
            data=bytes(changed),
            timeout=T,
        )
    assert resp.status_code == 200, resp.text
    rows = json.loads(run("--json", "stage-in", SCAN4, "--dest", str(dest)).stdout)
    assert rows[0]["status"] == "staged"
    assert local.read_bytes() == bytes(changed)
    manifest = json.loads((dest / T1_DIR / "manifest.json").read_text())
    record = next(f for f in manifest["files"] if f["path"] == "0003.dcm")
    assert record["md5"] == md5(bytes(changed)) == xnat_files(own)["0003.dcm"]["digest"]


# -- bad downloads ---------------------------------------------------------------------------------
class _Body:
    """A streamed response whose body is fixed bytes (a broken proxy, a hostile server)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_content(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self.data), size):
            yield self.data[start : start + size]


def serve(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """Every zip download answers ``data``; listings still come from the sandbox."""

    @contextmanager
    def stream(self: XnatClient, method: str, path: str, what: str, **kwargs: Any) -> Any:
        yield _Body(data)

    monkeypatch.setattr(XnatClient, "stream", stream)


def real_zip(server: SandboxServer, **params: str) -> bytes:
    with admin(server) as session:
        resp = session.get(
            f"{server.url}{EXP}/scans/4/resources/DICOM/files",
            params={"format": "zip", **params},
            timeout=T,
        )
    assert resp.status_code == 200
    return resp.content


def test_a_download_that_is_not_a_zip_fails_cleanly(
    shared: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(monkeypatch, b"<html>proxy error</html>" * 100)
    dest = tmp_path / "in"
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4}: the download is not a valid zip (truncated or corrupt) "
        "(re-run to download it again)\n"
    )
    assert nothing_staged(dest)


@pytest.mark.parametrize(
    ("compression", "reason"),
    [
        ("0", f"Bad CRC-32 for file '{T1_PREFIX}0001.dcm'"),
        ("6", "Error -3 while decompressing data: invalid block type"),
    ],
    ids=["stored-crc", "deflated"],
)
def test_a_damaged_zip_entry_fails_cleanly(
    shared: SandboxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compression: str,
    reason: str,
) -> None:
    data = bytearray(real_zip(shared, compression=compression))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(T1_PREFIX + "0001.dcm")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    if compression == "0":
        data[start + 100] ^= 0x01  # one bit of the file's bytes
    else:
        data[start] |= 0b110  # the first deflate block claims the reserved type 3
    serve(monkeypatch, bytes(data))
    dest = tmp_path / "in"
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4}: 0001.dcm is corrupt in the zip ({reason}) "
        "(re-run to download it again)\n"
    )
    assert nothing_staged(dest)


@pytest.mark.parametrize(
    "entry", ["../evil", T1_PREFIX + "../../../../../../../evil", "{tmp}/evil"]
)
def test_zip_slip_entries_are_refused(
    shared: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    entry = entry.format(tmp=tmp_path)  # the last one: an absolute path
    buffer = io.BytesIO(real_zip(shared))
    with zipfile.ZipFile(buffer, "a") as zf:  # the genuine 12 files first, then the attack
        zf.writestr(zipfile.ZipInfo(entry), b"owned")
    serve(monkeypatch, buffer.getvalue())
    dest = tmp_path / "deep" / "in"
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: {SCAN4}: the zip entry {entry!r} would escape the destination\n"
    )
    assert nothing_staged(dest)
    assert not list(tmp_path.rglob("evil*"))


def test_a_cut_download_is_retried_then_fails_then_succeeds(
    own: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    own.faults.update({"drop_every": 1, "drop_after": 1000})  # every zip is cut after 1000 B
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr.count("; restarting") == 2
    line = error_line(result)
    assert line.startswith(f"hpcbridge: error: {SCAN4}: download failed 3 times: ")
    assert line.endswith(" (check the network and re-run)")
    assert nothing_staged(dest)

    # Three transfers so far: with every second one cut, the next is cut and its retry is not.
    own.faults.update({"drop_every": 2})
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 0, result.output
    assert result.stderr.count("; restarting") == 1
    manifest = json.loads((dest / T1_DIR / "manifest.json").read_text())
    assert len(manifest["files"]) == 12
    assert all(
        stagein.md5_of(dest / T1_DIR / "files" / f["path"]) == f["md5"] for f in manifest["files"]
    )
    assert_nothing_half_written(dest)


def test_a_failed_update_keeps_the_previous_copy(
    own: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "in"
    assert run("stage-in", SCAN4, "--dest", str(dest)).exit_code == 0
    before = {p.name: p.read_bytes() for p in (dest / T1_DIR / "files").iterdir()}
    manifest = (dest / T1_DIR / "manifest.json").read_bytes()
    with admin(own) as session:  # XNAT changes, so the re-run must download
        resp = session.put(
            f"{own.url}{EXP}/scans/4/resources/DICOM/files/0001.dcm",
            params={"inbody": "true", "overwrite": "true"},
            data=before["0002.dcm"],
            timeout=T,
        )
    assert resp.status_code == 200
    serve(monkeypatch, b"garbage")
    assert run("stage-in", SCAN4, "--dest", str(dest)).exit_code == 1
    assert {p.name: p.read_bytes() for p in (dest / T1_DIR / "files").iterdir()} == before
    assert (dest / T1_DIR / "manifest.json").read_bytes() == manifest
    assert_nothing_half_written(dest)


# -- awkward archives ------------------------------------------------------------------------------
def test_shell_metacharacters_in_a_scan_type_are_only_a_strange_folder_name(
    own: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = "T1; rm -rf ~ $(touch pwned)"
    own.store.put_scan("XNAT_E00001", "7", "xnat:mrScanData", type=kind)
    with admin(own) as session:
        dcm = session.get(f"{own.url}{EXP}/scans/4/resources/DICOM/files/0001.dcm", timeout=T)
        resp = session.put(
            f"{own.url}{EXP}/scans/7/resources/DICOM/files/0001.dcm",
            params={"inbody": "true"},
            data=dcm.content,
            timeout=T,
        )
    assert resp.status_code == 200
    monkeypatch.chdir(tmp_path)
    home_had_pwned = (Path.home() / "pwned").exists()
    result = run("stage-in", "PTV000/Haofei01/Haofei01_MR1/7", "--dest", "in")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "in/Haofei01_MR1/scans/7-T1__rm__rf_____touch_pwned_/resources/DICOM"
    assert (folder / "files" / "0001.dcm").read_bytes() == dcm.content
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["scan"]["type"] == kind and manifest["dicom"]["instances"] == 1
    assert not [p for p in tmp_path.rglob("*pwned*") if p.name == "pwned"]
    assert (Path.home() / "pwned").exists() == home_had_pwned


def test_a_resource_without_dicom_is_refused_unless_allowed(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    result = run("stage-in", "PTV000/Haofei01/Haofei01_MR1/99", "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        "hpcbridge: error: PTV000/Haofei01/Haofei01_MR1/99: resource DICOM holds no DICOM "
        "(1 other file(s)) (use --allow-non-dicom to stage it anyway)\n"
    )
    assert nothing_staged(dest)

    args = ("PTV000/Haofei01/Haofei01_MR1/99", "--dest", str(dest), "--allow-non-dicom")
    assert run("stage-in", *args).exit_code == 0
    folder = dest / "Haofei01_MR1/scans/99-PhoenixZIPReport/resources/DICOM"
    assert [p.name for p in (folder / "files").iterdir()] == ["phoenix_report.txt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dicom"]["instances"] == 0
    assert manifest["dicom"]["non_dicom"] == ["phoenix_report.txt"]


def test_a_scan_without_the_resource_says_so(own: SandboxServer, tmp_path: Path) -> None:
    own.store.put_scan("XNAT_E00001", "7", "xnat:mrScanData", type="T2")
    dest = tmp_path / "in"
    result = run("stage-in", "PTV000/Haofei01/Haofei01_MR1/7", "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        "hpcbridge: error: PTV000/Haofei01/Haofei01_MR1/7 has no resource DICOM\n"
    )
    result = run("stage-in", SCAN4, "--resource", "NIFTI", "--dest", str(dest))
    assert result.stderr == f"hpcbridge: error: {SCAN4} has no resource NIFTI\n"
    assert nothing_staged(dest)


# -- a full disk -----------------------------------------------------------------------------------
def test_too_little_free_space_stops_before_downloading(
    shared: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stagein.shutil, "disk_usage", lambda path: usage(2**40, 2**40, 2**20))
    dest = tmp_path / "in"
    before = bytes_out(shared)
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    assert result.stderr == (
        f"hpcbridge: error: not enough free space in {dest}: need 64.1 MiB, have 1.0 MiB "
        "(free space or choose another --dest)\n"
    )
    assert bytes_out(shared) - before < T1_BYTES // 4
    assert nothing_staged(dest)


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stage", ["download", "extract", "manifest"])
def test_a_disk_filling_up_while_writing_fails_cleanly(
    shared: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    dest = tmp_path / "in"
    staging = dest / ".hpcbridge-staging/Haofei01_MR1/4-Ax_3D_T1"
    if stage == "manifest":
        real_write_text = pathlib.Path.write_text

        def write_text(self: Path, *args: Any, **kwargs: Any) -> int:
            if self.name == "manifest.json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
        target = "DICOM/manifest.json"
    else:
        mode = "wb" if stage == "download" else "xb"

        def full_open(file: Any, how: str = "r", *args: Any, **kwargs: Any) -> Any:
            fh = open(file, how, *args, **kwargs)
            return _FullDisk(fh) if how == mode else fh

        module = stagein.fetch if stage == "download" else stagein.unzip
        monkeypatch.setattr(module, "open", full_open, raising=False)
        target = "download.zip.part" if stage == "download" else "DICOM/files/0001.dcm"
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 1
    said = re.fullmatch(
        f"hpcbridge: error: {re.escape(SCAN4)}: cannot write (.+): No space left on device\n",
        result.stderr,
    )
    assert said, result.stderr
    # in a folder of this process's own under the scan's staging folder (<host>-<pid>-<random>)
    own, *rest = Path(said[1]).relative_to(staging).parts
    assert "/".join(rest) == target
    assert own.split("-")[1] == str(os.getpid())
    assert nothing_staged(dest)


def test_a_stage_in_removes_what_killed_stage_ins_left_and_nothing_else(
    shared: SandboxServer, tmp_path: Path
) -> None:
    dest = tmp_path / "in"
    staging = dest / ".hpcbridge-staging/Haofei01_MR1/4-Ax_3D_T1"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = stagein.fetch._HOST
    killed = f"{host}-{ended.stdout.strip()}-0badc0de"  # this host's, its process gone
    old = "login2-4242-0badc0de"  # another host's, untouched for three days
    working = f"{host}-{os.getpid()}-0badc0de"  # a live process's
    fresh = "login2-4343-0badc0de"  # another host's, maybe at work
    for name in (killed, old, working, fresh):
        (staging / name).mkdir(parents=True)
        (staging / name / "download.zip.part").write_bytes(b"PK")
    long_ago = time.time() - 3 * 24 * 3600
    for path in (staging / old / "download.zip.part", staging / old):
        os.utime(path, (long_ago, long_ago))
    result = run("stage-in", SCAN4, "--dest", str(dest))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in staging.iterdir()) == sorted([working, fresh])


# -- the library -----------------------------------------------------------------------------------
def test_the_library_reports_staged_and_skipped_scans(
    demo_sandbox: SandboxServer, tmp_path: Path
) -> None:
    from hpcbridge.credentials import Secret

    creds = Secret(demo_sandbox.user, demo_sandbox.password, "environment")
    with XnatClient(demo_sandbox.url, creds) as client:
        where = Address.parse("PTV000/Haofei02/Haofei02_MR1")
        first = stage_in(client, where, tmp_path, selection=Selection(ids=("1", "5")))
        again = stage_in(client, where, tmp_path, selection=Selection(types=("Local*",)))
    assert [(s.scan.id, s.skipped, s.files) for s in first.staged] == [
        ("1", False, 3),
        ("5", False, 8),
    ]
    assert [(s.scan.id, s.skipped) for s in again.staged] == [("1", True)]
    assert again.staged[0].dicom["instances"] == 3 and not again.failed
    assert (
        again.staged[0].files_dir
        == tmp_path / "Haofei02_MR1/scans/1-Localizer/resources/DICOM/files"
    )
