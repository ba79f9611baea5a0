"""examples/pbs-chain on the CI cluster: a lab copies the three job scripts and submit-chain.sh,
logs in once into a private HPCBRIDGE_HOME, and submits one scan's chain with qsub (Slurm's PBS
wrappers) on the cluster's own login node, which is this machine. The sandbox XNAT runs in this
process on loopback; what the jobs did is read from Slurm (squeue, its saved job environment),
from the chain's folder and from XNAT.

The fixtures are this module's own (tests/e2e/conftest.py's may change under it); jobs a test
leaves queued are cancelled by id at teardown.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import requests

from hpcbridge.sandbox import SandboxServer

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pbs-chain"
# The console script of the hpcbridge under test (pip install -e puts it beside the Python).
HPCBRIDGE = Path(sys.executable).parent / "hpcbridge"
T = 30  # seconds for one HTTP request or one quick command of the test itself
WAIT_LIMIT = 120  # seconds a chain may take before the test fails
SCAN = "PTV000/Haofei01/Haofei01_MR1/4"
# distinctive, so a search of everything on the cluster's side finds only real leaks
PASSWORD = "Pbs-chain-Pa55word"
#: Slurm states of jobs that have left the queue for good.
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
         "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"}  # fmt: skip


@dataclass(frozen=True)
class SlurmJob:
    id: str
    name: str
    state: str
    reason: str
    start: str
    end: str


def slurm_jobs(ids: list[str]) -> dict[str, SlurmJob]:
    """The jobs as Slurm lists them (ended ones too, for MinJobAge), by id."""
    listed = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%j|%T|%r|%S|%e"],
        capture_output=True, text=True, timeout=T, check=True,
    )  # fmt: skip
    jobs = [SlurmJob(*line.strip().split("|")) for line in listed.stdout.splitlines()]
    return {j.id: j for j in jobs}


def wait_until(ids: list[str], done: Any, what: str) -> dict[str, SlurmJob]:
    deadline = time.monotonic() + WAIT_LIMIT
    while True:
        jobs = slurm_jobs(ids)
        if len(jobs) == len(ids) and done(jobs):
            return jobs
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {WAIT_LIMIT} s: {jobs}")
        time.sleep(0.3)


def saved_environment(job_id: str) -> bytes:
    """The environment Slurm keeps for a job (sbatch's --export=ALL default, which the PBS
    wrapper keeps, sends the whole submitting shell there)."""
    config = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=T, check=True
    ).stdout
    state = next(
        line.split("=", 1)[1].strip()
        for line in config.splitlines()
        if line.startswith("StateSaveLocation")
    )
    path = Path(state) / f"hash.{int(job_id) % 10}" / f"job.{job_id}" / "environment"
    assert path.is_file(), f"Slurm keeps no environment file for job {job_id} at {path}"
    return path.read_bytes()


def assert_nifti(data: bytes) -> None:
    """A gzipped NIfTI-1 image: the header size and magic of the format, and voxels after it."""
    image = gzip.decompress(data)
    assert struct.unpack("<i", image[:4])[0] == 348
    assert image[344:348] == b"n+1\0"
    assert len(image) > 352 + 1000


@dataclass
class Lab:
    """A lab's copy of the example, its private HPCBRIDGE_HOME, and the jobs it submitted."""

    scripts: Path
    home: Path
    work: Path
    env: dict[str, str]
    submitted: list[str] = field(default_factory=list)

    def submit(self, scan: str) -> list[str]:
        done = subprocess.run(
            [str(self.scripts / "submit-chain.sh"), scan],
            capture_output=True, text=True, timeout=T, env=self.env, cwd=self.work.parent,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        ids = done.stdout.split()
        self.submitted += ids
        assert len(ids) == 3, done.stdout
        assert done.stderr.strip() == (
            f"{scan}: jobs {ids[0]} -> {ids[1]} -> {ids[2]} (stage-in -> convert -> stage-out); "
            f"logs in {self.work / scan.replace('/', '_')}/logs"
        )
        return ids


@pytest.fixture()
def sandbox(make_sandbox: Any) -> SandboxServer:
    server: SandboxServer = make_sandbox(admin_password=PASSWORD)
    return server


@pytest.fixture()
def lab(cluster: dict[str, Any], sandbox: SandboxServer, tmp_path: Path) -> Iterator[Lab]:
    for tool in ("qsub", "qdel", "squeue", "dcm2niix"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed, but the test cluster is up")
    scripts = tmp_path / "lab" / "pbs-chain"
    shutil.copytree(EXAMPLE, scripts)
    home = tmp_path / "lab" / "hpcbridge-chain"
    # A shell with nothing of hpcbridge's but the password a user may have exported: the chain
    # must not hand it to the jobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCBRIDGE_")}
    env.update(HPCBRIDGE_HOME=str(home), HPCBRIDGE=str(HPCBRIDGE))
    login = subprocess.run(
        [str(HPCBRIDGE), "login", "--xnat", sandbox.url, "--user", sandbox.user,
         "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=T, env=env,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    env.update(CHAIN_WORK=str(tmp_path / "lab" / "chains"), HPCBRIDGE_PASSWORD=PASSWORD)
    lab = Lab(scripts, home, tmp_path / "lab" / "chains", env)
    yield lab
    if lab.submitted:
        live = [j.id for j in slurm_jobs(lab.submitted).values() if j.state not in ENDED]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=T)


def nifti_files(server: SandboxServer, scan: str) -> dict[str, dict[str, Any]]:
    project, subject, experiment, scan_id = scan.split("/")
    resp = requests.get(
        f"{server.url}/data/projects/{project}/subjects/{subject}/experiments/{experiment}"
        f"/scans/{scan_id}/resources/NIFTI/files",
        params={"format": "json"}, auth=(server.user, server.password), timeout=T,
    )  # fmt: skip
    if resp.status_code == 404:
        return {}
    resp.raise_for_status()
    return {r["Name"]: r for r in resp.json()["ResultSet"]["Result"]}


def test_pbs_chain_converts_a_scan_into_xnat_with_afterok_jobs(
    lab: Lab, sandbox: SandboxServer
) -> None:
    ids = lab.submit(SCAN)
    jobs = wait_until(ids, lambda js: all(j.state in ENDED for j in js.values()), "ended")
    assert [jobs[i].state for i in ids] == ["COMPLETED"] * 3, jobs
    assert [jobs[i].name for i in ids] == ["hb-stage-in", "hb-convert", "hb-stage-out"]
    # afterok: each job started only once the one before it had ended.
    for before, after in pairwise(jobs[i] for i in ids):
        assert datetime.fromisoformat(after.start) >= datetime.fromisoformat(before.end)

    # The NIfTI and its sidecar are in the scan's NIFTI resource, the very files the job wrote.
    folder = lab.work / SCAN.replace("/", "_")
    stored = nifti_files(sandbox, SCAN)
    assert sorted(stored) == ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz"]
    for name, row in stored.items():
        local = (folder / "out" / name).read_bytes()
        assert (int(row["Size"]), row["digest"]) == (len(local), hashlib.md5(local).hexdigest())
    assert_nifti((folder / "out" / "Ax_3D_T1_4.nii.gz").read_bytes())
    sidecar = json.loads((folder / "out" / "Ax_3D_T1_4.json").read_text())
    assert sidecar["ConversionSoftware"] == "dcm2niix"
    assert (folder / "in" / "Haofei01_MR1" / "scans").is_dir()
    for step in ("stage-in", "convert", "stage-out"):
        assert (folder / "logs" / f"{step}.out").is_file()
    assert "verified against XNAT's listing" in (folder / "logs" / "stage-out.out").read_text()

    # The token stayed in the private folder; neither it nor the password the submitting shell
    # had exported reached a file of the chain, a job's command line or a job's environment.
    assert stat.S_IMODE(lab.home.stat().st_mode) == 0o700
    token = json.loads((lab.home / "credentials.json").read_text())
    secret = next(iter(token["servers"].values()))["secret"]
    leaks = [PASSWORD, secret]
    for path in [*folder.rglob("*"), *lab.scripts.rglob("*")]:
        if path.is_file() and path.suffix not in (".dcm", ".gz"):
            text = path.read_text(errors="replace")
            assert not [s for s in leaks if s in text], path
    for job_id in ids:
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=T
        ).stdout
        environment = saved_environment(job_id)
        assert b"HPCBRIDGE_HOME=" + str(lab.home).encode() in environment
        for leak in leaks:
            assert leak not in shown
            assert leak.encode() not in environment, f"job {job_id}'s environment"


def test_pbs_chain_stops_after_a_failed_stage_in_until_its_jobs_are_deleted(
    lab: Lab, sandbox: SandboxServer
) -> None:
    missing = "PTV000/Haofei01/Haofei01_MR1/99"
    ids = lab.submit(missing)
    jobs = wait_until(
        ids,
        lambda js: js[ids[0]].state in ENDED and js[ids[1]].reason == "DependencyNeverSatisfied",
        "stage-in ended and the chain held",
    )
    # Slurm leaves the jobs after a failed one pending (PBS Pro deletes them): nothing ran.
    assert jobs[ids[0]].state == "FAILED"
    convert, stage_out = (jobs[i] for i in ids[1:])
    assert (convert.state, convert.reason) == ("PENDING", "DependencyNeverSatisfied")
    # (it waits on a job that never runs, so Slurm gives only the general reason)
    assert (stage_out.state, stage_out.reason) == ("PENDING", "Dependency")
    folder = lab.work / missing.replace("/", "_")
    error = (folder / "logs" / "stage-in.err").read_text()
    assert "hpcbridge: error:" in error and "99" in error, error
    assert not (folder / "out").exists()
    assert nifti_files(sandbox, SCAN) == {}

    # What the README says to do: qdel the rest of the chain.
    deleted = subprocess.run(["qdel", *ids[1:]], capture_output=True, text=True, timeout=T)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    wait_until(ids, lambda js: all(js[i].state == "CANCELLED" for i in ids[1:]), "cancelled")
