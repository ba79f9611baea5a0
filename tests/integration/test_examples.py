"""examples/ run as a user would run them, against a sandbox XNAT on loopback: the Python API
script with the local scheduler and the real dcm2niix, the cron wrapper and crontab lines driving
a run to its end, and the checks submit-chain.sh makes before it submits anything.

Everything that waits runs as a subprocess with a timeout; local jobs a test leaves behind are
cancelled and their runner processes waited for (by pid) at teardown.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hpcbridge.jobs import JobStore
from hpcbridge.sandbox import SandboxServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
API_SCRIPT = EXAMPLES / "python-api.py"
SYNC_WRAPPER = EXAMPLES / "cron" / "hpcbridge-sync.sh"
CRONTAB = EXAMPLES / "cron" / "crontab.txt"
SUBMIT_CHAIN = EXAMPLES / "pbs-chain" / "submit-chain.sh"
# The console script of the hpcbridge under test (pip install -e puts it beside the Python).
HPCBRIDGE = Path(sys.executable).parent / "hpcbridge"

T = 10  # seconds for one HTTP request of the test itself
WAIT_LIMIT = 120  # seconds one example may take before the test fails
SCAN = "PTV000/Haofei01/Haofei01_MR1/4"
SUBJECTS = ("Haofei01", "Haofei02", "Haofei03")
# dcm2niix names the outputs after the protocol and series (-f %p_%s).
T1_OUTPUTS = ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz", "hpcbridge-provenance.json"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")
# distinctive, so a search of the files an example wrote finds only real leaks
PASSWORD = "Examples-Pa55word"
IN_CI = os.environ.get("CI", "").lower() == "true"


# --- helpers ---------------------------------------------------------------------------------


def require_tool(name: str) -> None:
    """As tests/conftest.py's: skip without the tool, but fail under CI=true, which has it."""
    if shutil.which(name) is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, but CI=true requires it")
        pytest.skip(f"{name} is not installed")


def run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = WAIT_LIMIT, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ), **kw
    )


def hb(*args: str, timeout: float = WAIT_LIMIT) -> subprocess.CompletedProcess[str]:
    return run([str(HPCBRIDGE), *args], timeout=timeout)


def status() -> dict[str, Any]:
    done = hb("--json", "status")
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


class Xnat:
    """The test's own view of the sandbox, with the admin's password (not the example's)."""

    def __init__(self, server: SandboxServer) -> None:
        self.server = server
        self.http = requests.Session()
        self.http.auth = (server.user, server.password)

    def scan_url(self, scan: str) -> str:
        project, subject, experiment, scan_id = scan.split("/")
        return (
            f"{self.server.url}/data/projects/{project}/subjects/{subject}"
            f"/experiments/{experiment}/scans/{scan_id}"
        )

    def files(self, scan: str, resource: str = "NIFTI") -> dict[str, dict[str, Any]]:
        """The resource's files by name (size, digest); {} when the resource does not exist."""
        resp = self.http.get(
            f"{self.scan_url(scan)}/resources/{resource}/files",
            params={"format": "json"},
            timeout=T,
        )
        if resp.status_code == 404:
            return {}
        resp.raise_for_status()
        return {r["Name"]: r for r in resp.json()["ResultSet"]["Result"]}

    def file(self, scan: str, name: str, resource: str = "NIFTI") -> bytes:
        resp = self.http.get(f"{self.scan_url(scan)}/resources/{resource}/files/{name}", timeout=T)
        resp.raise_for_status()
        return resp.content


def assert_nifti(data: bytes) -> None:
    """A gzipped NIfTI-1 image: the header size and magic of the format, and voxels after it."""
    image = gzip.decompress(data)
    assert struct.unpack("<i", image[:4])[0] == 348
    assert image[344:348] == b"n+1\0"
    assert len(image) > 352 + 1000


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture()
def sandbox(make_sandbox: Any) -> SandboxServer:
    """A fresh seeded sandbox whose admin password is worth searching files for."""
    server: SandboxServer = make_sandbox(admin_password=PASSWORD)
    return server


@pytest.fixture()
def xnat(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Xnat]:
    """The default profile pointed at a fresh sandbox, polling quickly, as test_runs.py does."""
    require_tool("dcm2niix")
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    monkeypatch.setenv("HPCBRIDGE_POLL_INTERVAL", "0.2")
    view = Xnat(sandbox)
    yield view
    view.http.close()


@pytest.fixture(autouse=True)
def nothing_left_running(no_local_jobs_left: None) -> None:
    """Every test ends with no local job left running (tests/conftest.py)."""


# --- examples/python-api.py ------------------------------------------------------------------


def test_python_api_script_converts_one_scan_into_its_nifti_resource(
    xnat: Xnat, isolated_home: Path
) -> None:
    done = run([sys.executable, str(API_SCRIPT), SCAN])
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^{SCAN}: job \d+ submitted, waiting$", done.stderr, re.M), done.stderr

    stored = xnat.files(SCAN)
    assert sorted(stored) == T1_OUTPUTS
    # It says what went where, and the sizes are what XNAT stored.
    printed = {}
    for line in done.stdout.splitlines():
        said = re.fullmatch(rf"{SCAN} NIFTI/(\S+) (\d+) bytes", line)
        assert said, done.stdout
        printed[said[1]] = int(said[2])
    assert printed == {name: int(row["Size"]) for name, row in stored.items()}
    image = xnat.file(SCAN, "Ax_3D_T1_4.nii.gz")
    assert_nifti(image)
    assert hashlib.md5(image).hexdigest() == stored["Ax_3D_T1_4.nii.gz"]["digest"]
    sidecar = json.loads(xnat.file(SCAN, "Ax_3D_T1_4.json"))
    assert sidecar["ConversionSoftware"] == "dcm2niix"
    provenance = json.loads(xnat.file(SCAN, "hpcbridge-provenance.json"))
    assert provenance["files"] == ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz"]
    # The job went through the profile's scheduler (local here) and finished there.
    jobs = JobStore(isolated_home, "default").all()
    assert len(jobs) == 1
    record = jobs[0].to_json()
    assert (record["scheduler"], record["state"], record["exit_code"]) == ("local", "finished", 0)
    assert provenance["job"] == record["id"]
    # The password it used came from the environment; it wrote it nowhere.
    for path in isolated_home.rglob("*"):
        if path.is_file() and path.suffix not in (".dcm", ".gz"):
            assert xnat.server.password not in path.read_text(errors="replace"), path

    # Run again: the same files are replaced, not joined by dcm2niix's renamed copies.
    again = run([sys.executable, str(API_SCRIPT), SCAN])
    assert again.returncode == 0, again.stderr
    assert sorted(xnat.files(SCAN)) == T1_OUTPUTS
    assert len(JobStore(isolated_home, "default").all()) == 2


def test_python_api_script_reports_a_missing_scan_in_one_line_and_submits_nothing(
    xnat: Xnat, isolated_home: Path
) -> None:
    done = run([sys.executable, str(API_SCRIPT), "PTV000/Haofei01/Haofei01_MR1/99"])
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("python-api.py: error: ")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "PTV000/Haofei01/Haofei01_MR1/99" in done.stderr, done.stderr
    assert not (isolated_home / "jobs").exists()
    assert not (isolated_home / "local-jobs").exists()

    usage = run([sys.executable, str(API_SCRIPT)])
    assert usage.returncode == 1
    assert "python examples/python-api.py PROJECT/SUBJECT/EXPERIMENT/SCAN" in usage.stderr


# --- examples/cron ---------------------------------------------------------------------------


def start_run() -> str:
    """A run over the sandbox's three T1 scans on the local scheduler, left for cron to finish."""
    started = hb("run", "dcm2niix", "PTV000", "--scan-type", "*T1*")
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def wrapper(*args: str) -> subprocess.CompletedProcess[str]:
    """One pass of the wrapper, as cron would start it (with this checkout's hpcbridge)."""
    environment = dict(os.environ, HPCBRIDGE=str(HPCBRIDGE))
    return run([str(SYNC_WRAPPER), *args], env=environment, timeout=60)


def test_sync_wrapper_called_repeatedly_moves_a_run_to_its_end(xnat: Xnat) -> None:
    run_id = start_run()
    passes = []
    deadline = time.monotonic() + WAIT_LIMIT
    while status()["run"]["state"] != "done":
        assert time.monotonic() < deadline, f"run not done after {WAIT_LIMIT} s: {status()}"
        done = wrapper()
        assert done.returncode == 0, done.stdout + done.stderr
        passes.append(done.stdout)
        time.sleep(0.3)
    assert passes, "the run ended before any cron pass"

    assert [j["state"] for j in status()["jobs"]] == ["uploaded"] * 3
    for subject in SUBJECTS:
        assert sorted(xnat.files(f"PTV000/{subject}/{subject}_MR1/4")) == T1_OUTPUTS
    # Every line of every pass is timestamped, and each pass names its end and exit code.
    for log in passes:
        lines = log.splitlines()
        assert lines and all(STAMP.match(line) for line in lines), log
        assert lines[0].endswith(" starting: hpcbridge sync")
        assert lines[-1].endswith(" hpcbridge sync exited with 0")
    assert any(f"run {run_id}: 3/3 ended (uploaded 3)" in log for log in passes), passes


def test_sync_wrapper_skips_a_pass_while_another_holds_the_lock(
    xnat: Xnat, isolated_home: Path
) -> None:
    start_run()
    before = status()
    lock_file = isolated_home / "sync.lock"
    with open(lock_file, "a") as held:
        # flock(1) in the wrapper and fcntl.flock here take the same lock (flock(2)): this is
        # what a pass still running holds.
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        began = time.monotonic()
        skipped = wrapper()
        took = time.monotonic() - began
        # ... and a little later the run's jobs have ended, but nobody synced it.
        time.sleep(3)
        unchanged = status()
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert took < 5, f"the wrapper waited {took:.1f} s for the lock instead of skipping"
    lines = skipped.stdout.splitlines()
    assert len(lines) == 1 and STAMP.match(lines[0]), skipped.stdout
    assert lines[0].endswith(f"another sync pass still holds {lock_file}; skipping this one")
    assert unchanged["jobs"] == before["jobs"]

    # Once the lock is free the next pass runs.
    ran = wrapper()
    assert ran.returncode == 0, ran.stdout
    assert ran.stdout.splitlines()[-1].endswith(" hpcbridge sync exited with 0")
    assert status()["jobs"] != before["jobs"]


def test_sync_wrapper_exits_with_syncs_exit_code_and_timestamps_its_error(xnat: Xnat) -> None:
    start_run()
    done = wrapper("99")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert all(STAMP.match(line) for line in lines), done.stdout
    assert any("hpcbridge: error:" in line and "99" in line for line in lines), done.stdout
    assert lines[0].endswith(" starting: hpcbridge sync 99")
    assert lines[-1].endswith(" hpcbridge sync exited with 1")


def crontab_lines() -> tuple[str, list[tuple[str, str]]]:
    """The crontab's PATH and its (schedule, command) lines, commented-out alternatives too."""
    path = ""
    entries = []
    for line in CRONTAB.read_text().splitlines():
        if line.startswith("PATH="):
            path = line.removeprefix("PATH=")
        entry = re.fullmatch(r"#?((?:[0-9*/,-]+ ){4}[0-9*/,-]+) (.*)", line)
        if entry:
            entries.append((entry[1], entry[2]))
    return path, entries


def test_crontab_lines_run_every_10_minutes_as_cron_would_run_them(
    xnat: Xnat, tmp_path: Path
) -> None:
    path, entries = crontab_lines()
    assert [schedule for schedule, _ in entries] == ["*/10 * * * *"] * 2
    plain, wrapped = (command for _, command in entries)
    assert plain.startswith("hpcbridge --quiet sync ")
    start_run()

    # cron: /bin/sh, a bare environment, HOME, and the crontab's PATH (its placeholder folder
    # replaced by where hpcbridge is installed here).
    home = tmp_path / "cron-home"
    (home / "bin").mkdir(parents=True)
    shutil.copy(SYNC_WRAPPER, home / "bin" / "hpcbridge-sync.sh")
    keep = ("HPCBRIDGE_HOME", "HPCBRIDGE_XNAT", "HPCBRIDGE_USER", "HPCBRIDGE_PASSWORD")
    env = {k: os.environ[k] for k in keep}
    env.update(HOME=str(home), SHELL="/bin/sh")
    env["PATH"] = path.replace("/opt/hpcbridge/bin", str(HPCBRIDGE.parent))
    assert "/opt/hpcbridge/bin" in path
    log = home / "hpcbridge-sync.log"
    deadline = time.monotonic() + WAIT_LIMIT
    while status()["run"]["state"] != "done":
        assert time.monotonic() < deadline, f"run not done after {WAIT_LIMIT} s"
        for command in (plain, wrapped):
            done = run(["/bin/sh", "-c", command], env=env, timeout=60)
            assert done.returncode == 0, log.read_text()
        time.sleep(0.3)
    assert [j["state"] for j in status()["jobs"]] == ["uploaded"] * 3
    # --quiet left nothing; the wrapper's lines are all timestamped.
    text = log.read_text()
    assert text and all(STAMP.match(line) for line in text.splitlines()), text
    assert "hpcbridge sync exited with 0" in text


# --- examples/pbs-chain: what submit-chain.sh refuses before it submits anything --------------


def test_submit_chain_refuses_to_run_without_a_private_token(xnat: Xnat, tmp_path: Path) -> None:
    """No cluster needed: each refusal comes before the chain's folder is made or qsub runs."""
    lab_home = tmp_path / "lab-home"
    work = tmp_path / "chains"
    base = {k: v for k, v in os.environ.items() if not k.startswith("HPCBRIDGE_")}
    base.update(CHAIN_WORK=str(work), HPCBRIDGE=str(HPCBRIDGE))

    def submit(**env: str) -> subprocess.CompletedProcess[str]:
        return run([str(SUBMIT_CHAIN), SCAN], env=dict(base, **env), timeout=60, cwd=tmp_path)

    unset = submit()
    assert unset.returncode == 1
    assert "set HPCBRIDGE_HOME to a private folder" in unset.stderr

    # A password in the environment is not used in place of a token: the jobs would need it.
    no_token = submit(
        HPCBRIDGE_HOME=str(lab_home),
        HPCBRIDGE_XNAT=xnat.server.url,
        HPCBRIDGE_USER=xnat.server.user,
        HPCBRIDGE_PASSWORD=xnat.server.password,
    )
    assert no_token.returncode == 1
    assert no_token.stderr.strip() == (
        f"submit-chain.sh: no token in {lab_home}: run `hpcbridge login --xnat URL` with it set"
    )

    login = run(
        [str(HPCBRIDGE), "login", "--xnat", xnat.server.url, "--user", xnat.server.user,
         "--password-stdin"],
        env=dict(base, HPCBRIDGE_HOME=str(lab_home)), input=xnat.server.password + "\n",
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    lab_home.chmod(0o755)
    shared = submit(HPCBRIDGE_HOME=str(lab_home))
    assert shared.returncode == 1
    assert shared.stderr.strip() == (
        f"submit-chain.sh: {lab_home} is open to other users (mode 755): chmod go= {lab_home}"
    )
    lab_home.chmod(0o700)
    assert stat.S_IMODE((lab_home / "credentials.json").stat().st_mode) == 0o600

    bad = submit(HPCBRIDGE_HOME=str(lab_home), HPCBRIDGE_XNAT="http://127.0.0.1:9")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1] == (
        f"submit-chain.sh: the token in {lab_home} does not work: `hpcbridge login` again"
    )
    assert not work.exists()
