"""examples/pbs-chain on the CI clusters: a lab copies the three job scripts and submit-chain.sh,
logs in once into a private HPCBRIDGE_HOME, and submits one scan's chain with qsub on the
cluster's own login node, which is this machine. Each test runs twice: with Slurm's PBS wrappers
(/usr/bin/qsub over the Slurm test cluster) and with real PBS Pro (OpenPBS, /opt/pbs/bin first on
the lab's PATH, as root, with a project and Artemis's data-transfer queue). The sandbox XNAT runs
in this process on loopback; what the jobs did is read from the scheduler itself (Slurm: squeue
and its saved job environment; PBS Pro: `qstat -x -f` of each job), from the chain's folder and
from XNAT.

The fixtures are this module's own (tests/e2e/conftest.py's may change under it); jobs a test
leaves queued are cancelled by id at teardown.
"""

from __future__ import annotations

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
SLURM, PBSPRO = "slurm-wrappers", "pbspro"
#: PBS Pro: a full test run shares the server's two cpus with these jobs (tests/e2e/test_pbspro.py).
PBS_WAIT_LIMIT = 240
PBS_PROJECT = "PTV000"


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


def pbs_job(bin_dir: Path, job_id: str) -> dict[str, Any]:
    """The PBS Pro server's own record of one job, ended ones too (`qstat -x -f -F json ID`; with
    several ids this server shows only the first, so one call per id)."""
    listed = subprocess.run(
        [str(bin_dir / "qstat"), "-x", "-f", "-F", "json", job_id],
        capture_output=True, text=True, timeout=T,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    job: dict[str, Any] = json.loads(listed.stdout)["Jobs"][job_id]
    return job


def pbs_wait_until(bin_dir: Path, ids: list[str], done: Any, what: str) -> dict[str, dict]:
    deadline = time.monotonic() + PBS_WAIT_LIMIT
    while True:
        jobs = {i: pbs_job(bin_dir, i) for i in ids}
        if done(jobs):
            return jobs
        if time.monotonic() > deadline:
            states = {i: (j["job_state"], j.get("comment")) for i, j in jobs.items()}
            pytest.fail(f"not {what} after {PBS_WAIT_LIMIT} s: {states}")
        time.sleep(0.5)


def pbs_time(value: str) -> datetime:
    """A PBS Pro time attribute ("Mon Dec  7 16:46:03 2026", server local time)."""
    return datetime.strptime(value, "%a %b %d %H:%M:%S %Y")


def pbs_shown(bin_dir: Path, job_id: str) -> str:
    """`qstat -x -f ID` as any user of the cluster may run it, its wrapped lines joined again
    (the text form folds long values such as Variable_List, which could split a secret)."""
    shown = subprocess.run(
        [str(bin_dir / "qstat"), "-x", "-f", job_id], capture_output=True, text=True, timeout=T
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return re.sub(r"\n\t", "", shown.stdout)


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
    #: SLURM (the PBS wrappers on /usr/bin) or PBSPRO (the real server's commands in pbs_bin)
    flavour: str = SLURM
    pbs_bin: Path = Path("/opt/pbs/bin")
    #: PBS Pro's default queue (the conversion's) and transfer queue (stage-in's and -out's)
    pbs_queues: tuple[str, str] = ("workq", "dtq")
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


@pytest.fixture(params=[SLURM, PBSPRO])
def lab(request: pytest.FixtureRequest, sandbox: SandboxServer, tmp_path: Path) -> Iterator[Lab]:
    flavour = str(request.param)
    # A shell with nothing of hpcbridge's but the password a user may have exported: the chain
    # must not hand it to the jobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCBRIDGE_")}
    pbs_bin, pbs_queues = Path("/opt/pbs/bin"), ("workq", "dtq")
    if flavour == SLURM:
        request.getfixturevalue("cluster")
        for tool in ("qsub", "qdel", "squeue", "dcm2niix"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} is not installed, but the test cluster is up")
    else:
        pbs = request.getfixturevalue("pbspro_cluster")["pbs"]
        pbs_bin, pbs_queues = Path(pbs["prefix"]) / "bin", (pbs["queue"], pbs["transfer_queue"])
        # The login node's shell on Artemis: PBS Pro's own qsub, a project, the transfer queue.
        env.update(
            PATH=f"{pbs_bin}{os.pathsep}{env['PATH']}",
            PBS_PROJECT=PBS_PROJECT,
            TRANSFER_QUEUE=pbs["transfer_queue"],
        )
        for tool in ("qsub", "qdel", "qstat"):
            assert shutil.which(tool, path=env["PATH"]) == str(pbs_bin / tool), tool
        if shutil.which("dcm2niix", path=env["PATH"]) is None:
            pytest.fail("dcm2niix is not installed, but the PBS Pro test cluster is up")
    scripts = tmp_path / "lab" / "pbs-chain"
    shutil.copytree(EXAMPLE, scripts)
    home = tmp_path / "lab" / "hpcbridge-chain"
    env.update(HPCBRIDGE_HOME=str(home), HPCBRIDGE=str(HPCBRIDGE))
    # The lab's dcm2niix is on the submitting shell's PATH only (a virtualenv's, say), which
    # Slurm passes to the jobs and PBS Pro does not; it notes each run in dcm2niix.log.
    tools = tmp_path / "lab" / "venv" / "bin"
    tools.mkdir(parents=True)
    real = shutil.which("dcm2niix", path=env["PATH"])
    (tools / "dcm2niix").write_text(
        f'#!/bin/sh\necho "$0 $*" >>{tools.parent / "dcm2niix.log"}\nexec {real} "$@"\n'
    )
    (tools / "dcm2niix").chmod(0o755)
    path = env["PATH"].split(os.pathsep)
    path.insert(1 if flavour == PBSPRO else 0, str(tools))
    env["PATH"] = os.pathsep.join(path)
    login = subprocess.run(
        [str(HPCBRIDGE), "login", "--xnat", sandbox.url, "--user", sandbox.user,
         "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=T, env=env,
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    env.update(CHAIN_WORK=str(tmp_path / "lab" / "chains"), HPCBRIDGE_PASSWORD=PASSWORD)
    lab = Lab(scripts, home, tmp_path / "lab" / "chains", env, flavour, pbs_bin, pbs_queues)
    yield lab
    if lab.submitted and flavour == SLURM:
        live = [j.id for j in slurm_jobs(lab.submitted).values() if j.state not in ENDED]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=T)
    elif lab.submitted:
        # One id per qdel: PBS Pro deletes none of several ids when one of them fails.
        for job_id in lab.submitted:
            if pbs_job(pbs_bin, job_id)["job_state"] != "F":
                subprocess.run([str(pbs_bin / "qdel"), job_id], capture_output=True, timeout=T)


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
    if lab.flavour == SLURM:
        jobs = wait_until(ids, lambda js: all(j.state in ENDED for j in js.values()), "ended")
        assert [jobs[i].state for i in ids] == ["COMPLETED"] * 3, jobs
        assert [jobs[i].name for i in ids] == ["hb-stage-in", "hb-convert", "hb-stage-out"]
        # afterok: each job started only once the one before it had ended.
        for before, after in pairwise(jobs[i] for i in ids):
            assert datetime.fromisoformat(after.start) >= datetime.fromisoformat(before.end)
    else:
        assert_pbspro_chain_finished(lab, ids)

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
        if lab.flavour == PBSPRO:  # delivered when the job ended, for its owner only
            for log in (folder / "logs").glob(f"{step}.*"):
                assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
    assert "verified against XNAT's listing" in (folder / "logs" / "stage-out.out").read_text()
    # The conversion ran the lab's dcm2niix (chain.env names it; PBS Pro's jobs get the login
    # shell's PATH, not the submitting one), once.
    ran = (lab.work.parent / "venv" / "dcm2niix.log").read_text().splitlines()
    assert [line.split()[0] for line in ran] == [str(lab.work.parent / "venv/bin/dcm2niix")]

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
    if lab.flavour == PBSPRO:
        assert_pbspro_jobs_keep_secrets(lab, ids, folder, leaks)
        return
    for job_id in ids:
        shown = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=T
        ).stdout
        environment = saved_environment(job_id)
        assert b"HPCBRIDGE_HOME=" + str(lab.home).encode() in environment
        for leak in leaks:
            assert leak not in shown
            assert leak.encode() not in environment, f"job {job_id}'s environment"


def assert_pbspro_chain_finished(lab: Lab, ids: list[str]) -> None:
    """All three ran and exited 0, each on its queue with the project, in afterok order."""
    assert all(re.fullmatch(r"\d+\.\w+", i) for i in ids), ids  # PBS Pro names its server
    jobs = pbs_wait_until(
        lab.pbs_bin, ids, lambda js: all(j["job_state"] == "F" for j in js.values()), "ended"
    )
    ended = [(jobs[i]["job_state"], jobs[i]["substate"], jobs[i].get("Exit_status")) for i in ids]
    assert ended == [("F", 92, 0)] * 3, jobs
    assert [jobs[i]["Job_Name"] for i in ids] == ["hb-stage-in", "hb-convert", "hb-stage-out"]
    compute, transfer = lab.pbs_queues
    assert [jobs[i]["queue"] for i in ids] == [transfer, compute, transfer]
    assert {jobs[i]["project"] for i in ids} == {PBS_PROJECT}
    assert [jobs[i]["run_count"] for i in ids] == [1, 1, 1]
    # afterok: each job started only once the server had the one before it end (obittime),
    # although all three were queued at once.
    for before, after in pairwise(jobs[i] for i in ids):
        assert pbs_time(after["stime"]) >= pbs_time(before["obittime"]), (before, after)
        assert pbs_time(after["ctime"]) <= pbs_time(before["obittime"])
    # The jobs' own PBS_O_WORKDIR is the scan's folder (PBS Pro starts them in $HOME).
    folder = lab.work / SCAN.replace("/", "_")
    assert {jobs[i]["Variable_List"]["PBS_O_WORKDIR"] for i in ids} == {str(folder)}


def assert_pbspro_jobs_keep_secrets(
    lab: Lab, ids: list[str], folder: Path, leaks: list[str]
) -> None:
    """PBS Pro keeps no copy of the submitting shell's environment (Slurm's saved_environment):
    a job gets its Variable_List, which without qsub -v/-V holds only PBS_O_* variables, and
    `qstat -f` shows it to every user. So neither secret, nor any hpcbridge setting, is there:
    the jobs read those from chain.env."""
    for job_id in ids:
        job = pbs_job(lab.pbs_bin, job_id)
        variables = job["Variable_List"]
        assert variables["PBS_O_WORKDIR"] == str(folder)
        assert all(name.startswith("PBS_O_") for name in variables), variables
        assert not [v for v in variables.values() if str(lab.home) in str(v)], variables
        shown = pbs_shown(lab.pbs_bin, job_id)
        assert f"PBS_O_WORKDIR={folder}" in shown
        for leak in leaks:
            assert leak not in shown, f"qstat -x -f {job_id}"
            assert leak not in json.dumps(job), f"qstat -x -f -F json {job_id}"


def test_pbs_chain_stops_after_a_failed_stage_in_until_its_jobs_are_deleted(
    lab: Lab, sandbox: SandboxServer
) -> None:
    missing = "PTV000/Haofei01/Haofei01_MR1/99"
    ids = lab.submit(missing)
    if lab.flavour == PBSPRO:
        assert_pbspro_deletes_the_rest_of_the_chain(lab, ids, missing, sandbox)
        return
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


def assert_pbspro_deletes_the_rest_of_the_chain(
    lab: Lab, ids: list[str], missing: str, sandbox: SandboxServer
) -> None:
    """PBS Pro deletes a job whose afterok parent failed, and so that job's own dependent: both
    end F without an Exit_status, never having run, and nothing is left for the user to qdel."""
    jobs = pbs_wait_until(
        lab.pbs_bin, ids, lambda js: all(j["job_state"] == "F" for j in js.values()), "ended"
    )
    stage_in = jobs[ids[0]]
    assert (stage_in["job_state"], stage_in["substate"], stage_in["run_count"]) == ("F", 93, 1)
    assert stage_in["Exit_status"] > 0, stage_in
    for job_id in ids[1:]:
        job = jobs[job_id]
        assert job["job_state"] == "F", job
        never_ran = {"Exit_status", "stime", "exec_host", "resources_used", "obittime"}
        assert not never_ran & job.keys(), job
        assert job.get("run_count", 0) == 0, job
    folder = lab.work / missing.replace("/", "_")
    error = (folder / "logs" / "stage-in.err").read_text()
    assert "hpcbridge: error:" in error and "99" in error, error
    assert not (folder / "out").exists()
    for step in ("convert", "stage-out"):
        assert not (folder / "logs" / f"{step}.out").exists()
        assert not (folder / "logs" / f"{step}.err").exists()
    assert nifti_files(sandbox, SCAN) == {}

    # The README's qdel is for Slurm: on PBS Pro the chain has already left the queue, and
    # qdel says so.
    for job_id in ids[1:]:
        said = {
            command: subprocess.run(
                [command, job_id], capture_output=True, text=True, timeout=T, env=lab.env
            )
            for command in ("qstat", "qdel")
        }
        assert [(r.returncode, r.stderr.strip()) for r in said.values()] == [
            (35, f"qstat: {job_id} Job has finished, use -x or -H to obtain historical job "
                 "information"),
            (35, f"qdel: Job has finished {job_id}"),
        ]  # fmt: skip
