"""Whole runs on the CI cluster, through SSH, on qsub (Slurm's PBS wrappers) and on sbatch: a
bridge killed with SIGKILL part-way and resumed, a failing job and `retry`, and `--dry-run`.

The same scenarios as tests/integration/test_runs.py on the local scheduler, here against the
real scheduler, so that what hpcbridge says can be checked against what the scheduler saw
(squeue) and what XNAT (the sandbox, in this process) stored. Commands that wait run as
subprocesses with a timeout; quick ones run in-process. Jobs a test leaves in the queue are
cancelled by id and bridge processes killed by pid at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.jobs import JobStore
from hpcbridge.ledger import Ledger, ledger_path
from hpcbridge.sandbox import SandboxServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
T = 30  # seconds for one HTTP request or one quick command of the test itself
WAIT_LIMIT = 120  # seconds a waiting command may take before the test fails
FAST = ["--interval", "0.3"]
SUBJECTS = ("Haofei01", "Haofei02", "Haofei03")
T1_SCANS = [f"PTV000/{s}/{s}_MR1/4" for s in SUBJECTS]
RUN_T1 = ["run", "dcm2niix", "PTV000", "--scan-type", "*T1*"]
# uploaded beside the outputs (docs/runs.md, "What lands in XNAT")
PROVENANCE_FILE = "hpcbridge-provenance.json"
# dcm2niix names the outputs after the protocol and series (-f %p_%s).
T1_OUTPUTS = ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz", PROVENANCE_FILE]
IN_SCHEDULER = ("submitted", "running", "finished")

# Fails its first attempt (leaving a marker in its work folder) and succeeds on the next.
FLAKY_RECIPE = """name = "flaky"
version = "7"
description = "fails once per work folder, then lists its input"
[inputs]
resource = "DICOM"
[[outputs]]
glob = "*.txt"
resource = "LISTING"
[resources]
memory = "100MB"
walltime = "00:05:00"
[run]
command = '''
if [ ! -e {{ work_dir }}/tried-once ]; then
    touch {{ work_dir }}/tried-once
    echo "flaky: first attempt fails on purpose" >&2
    exit 3
fi
ls {{ input_dir }} > {{ output_dir }}/listing.txt
'''
"""


# --- helpers ---------------------------------------------------------------------------------


def scheduler_name(kind: str) -> str:
    """The profile's scheduler for a flavour of test cluster: PBS Pro's is `pbs`."""
    return "pbs" if kind == "pbspro" else kind


def cli(*args: str) -> Result:
    """A quick command, in-process."""
    return CliRunner().invoke(main, list(args))


def bridge_env() -> dict[str, str]:
    """This test's environment (HPCBRIDGE_HOME, the sandbox XNAT), importing this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def hb(*args: str, timeout: float = WAIT_LIMIT) -> Done:
    """A command that may wait, as a subprocess that cannot outlive ``timeout``."""
    proc = subprocess.run(
        [sys.executable, "-m", "hpcbridge", *args],
        capture_output=True, text=True, timeout=timeout, env=bridge_env(),
    )  # fmt: skip
    return Done(proc.returncode, proc.stdout, proc.stderr)


def status_json(run_id: int | None = None) -> dict[str, Any]:
    result = cli("--json", "status", *([str(run_id)] if run_id is not None else []))
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def states(data: dict[str, Any]) -> dict[str, str]:
    return {j["scan"]: j["state"] for j in data["jobs"]}


def job_records(home: Path) -> list[dict[str, Any]]:
    """hpcbridge's own records of what it submitted, one per job (profile ci)."""
    return [j.to_json() for j in JobStore(home, "ci").all()]


def tree(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def ledger_dump() -> list[str]:
    """Every row of the ledger, read without writing to it."""
    path = ledger_path(load_settings())
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return list(db.iterdump())


class Xnat:
    """The test's own view of the sandbox: one admin session, and a count of every file XNAT
    stored (the sandbox runs in this process), so a second upload of a file is seen even when
    it replaced the first."""

    def __init__(self, server: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.server = server
        self.stored: Counter[tuple[Any, str]] = Counter()
        add_file = server.store.add_file

        def counting(resource_id: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            stored = add_file(resource_id, name, *args, **kwargs)
            if stored:
                self.stored[(resource_id, name)] += 1
            return stored

        monkeypatch.setattr(server.store, "add_file", counting)
        self.http = requests.Session()
        self.http.auth = (server.user, server.password)
        self.stats()  # opens this session now, before any count is taken

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http.get(self.server.url + "/sandbox/stats", timeout=T).json()
        return data

    def _scan(self, scan: str) -> str:
        project, subject, experiment, scan_id = scan.split("/")
        return (
            f"{self.server.url}/data/projects/{project}/subjects/{subject}"
            f"/experiments/{experiment}/scans/{scan_id}"
        )

    def files(self, scan: str, resource: str) -> list[str]:
        """The file names in a scan's resource, duplicates kept; [] when it does not exist."""
        resp = self.http.get(
            f"{self._scan(scan)}/resources/{resource}/files", params={"format": "json"}, timeout=T
        )
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return sorted(r["Name"] for r in resp.json()["ResultSet"]["Result"])

    def file(self, scan: str, resource: str, name: str) -> bytes:
        resp = self.http.get(f"{self._scan(scan)}/resources/{resource}/files/{name}", timeout=T)
        resp.raise_for_status()
        return resp.content

    def workflows(self, pipeline: str) -> list[dict[str, Any]]:
        """The History entries of a pipeline, oldest first."""
        resp = self.http.get(
            f"{self.server.url}/data/workflows",
            params={"format": "json", "wrk:workflowData/pipeline_name": pipeline},
            timeout=T,
        )
        resp.raise_for_status()
        fields = [w["data_fields"] for w in resp.json()["items"]]
        return sorted(fields, key=lambda f: int(f["wrk_workflowData_id"]))


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Requests by method and sessions created between two stats snapshots."""
    methods = set(before["requests"]) | set(after["requests"])
    change = {m: after["requests"].get(m, 0) - before["requests"].get(m, 0) for m in methods}
    change["sessions"] = after["sessions_created"] - before["sessions_created"]
    return change


class Bridge:
    """`hpcbridge run ... --wait` as a real child process, its output going to files."""

    def __init__(self, folder: Path, *args: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = folder / "stdout", folder / "stderr"
        with self.stdout_path.open("w") as out, self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hpcbridge", *args],
                stdout=out, stderr=err, env=bridge_env(),
            )  # fmt: skip

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        """SIGKILL, by its own pid: no cleanup, no last words."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=T)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture()
def xnat(
    run_profile: Path, sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Xnat]:
    """The ci profile's XNAT (this test's own sandbox), seen by the test."""
    view = Xnat(sandbox, monkeypatch)
    yield view
    view.http.close()


@pytest.fixture()
def bridge(tmp_path: Path) -> Iterator[Callable[..., Bridge]]:
    started: list[Bridge] = []

    def start(*args: str) -> Bridge:
        started.append(Bridge(tmp_path / f"bridge-{len(started)}", *args))
        return started[-1]

    yield start
    for b in started:
        b.kill()


def wait_for_ledger(
    running: Bridge, moment: Callable[[dict[str, Any]], bool], what: str, limit: float = 60
) -> dict[str, Any]:
    """Poll `hpcbridge --json status` until ``moment`` holds; fail if the bridge ends first."""
    deadline = time.monotonic() + limit
    seen: dict[str, Any] = {}
    while True:
        result = cli("--json", "status")
        if result.exit_code == 0:
            seen = json.loads(result.stdout)
            if moment(seen):
                return seen
        if running.proc.poll() is not None:
            pytest.fail(
                f"the bridge ended (exit {running.proc.returncode}) before {what}; last seen "
                f"{seen and states(seen)}:\n{running.stderr}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:g} s waiting for {what}: {seen and states(seen)}")
        time.sleep(0.05)


def per_folder(jobs: list[Any]) -> Counter[str]:
    """How many scheduler jobs ran in each work folder (scripts live in ``<work>/.hpcbridge``)."""
    return Counter(str(Path(j.script).parent.parent) for j in jobs)


def counts(data: dict[str, Any]) -> Counter[str]:
    return Counter(j["state"] for j in data["jobs"])


# --- 1: kill -9 and resume -------------------------------------------------------------------


def all_submitted_none_uploaded(data: dict[str, Any]) -> bool:
    jobs = data["jobs"]
    return len(jobs) == 3 and all(j["job_id"] for j in jobs) and counts(data)["uploaded"] == 0


def one_uploaded_one_in_scheduler(data: dict[str, Any]) -> bool:
    seen = counts(data)
    return 1 <= seen["uploaded"] < 3 and sum(seen[s] for s in IN_SCHEDULER) >= 1


KILL_POINTS = {
    # every scan submitted, nothing uploaded yet (the bridge sleeps between passes)
    "all-submitted": ([], all_submitted_none_uploaded, "rerun"),
    # one scan at a time: some uploaded, the next in the scheduler, the rest not submitted
    "one-uploaded": (["--max-queued", "1"], one_uploaded_one_in_scheduler, "sync"),
}


def assert_finished_exactly_once(
    xnat: Xnat, home: Path, work_root: Path, scheduler_queue: Any
) -> None:
    """Every T1 uploaded once, by one job each, with nothing submitted or uploaded twice."""
    data = status_json(1)
    assert data["run"]["state"] == "done"
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    ledger_ids = sorted(j["job_id"] for j in data["jobs"])
    # The scheduler's own view: exactly one job per scan's work folder, all ended well.
    seen = scheduler_queue.under(work_root)
    assert per_folder(seen) == {j["work_dir"]: 1 for j in data["jobs"]}, seen  # no duplicates
    assert sorted(j.id for j in seen) == ledger_ids
    assert {j.state for j in seen} == {"COMPLETED"}, seen
    # hpcbridge's job records agree, down to the job names the scheduler shows.
    records = job_records(home)
    assert sorted(r["id"] for r in records) == ledger_ids
    assert sorted(r["work_dir"] for r in records) == sorted(j["work_dir"] for j in data["jobs"])
    assert sorted((r["id"], r["name"]) for r in records) == sorted((j.id, j.name) for j in seen)
    for subject in SUBJECTS:
        assert sum(j.name.endswith(f"_{subject}_MR1_4") for j in seen) == 1, seen
    with Ledger.for_settings(load_settings()) as ledger:
        assert [r.id for r in ledger.runs()] == [1]
        for job in ledger.jobs(1):
            events = [str(e.to_state) for e in ledger.events(job.job_id)]
            assert events.count("uploaded") == 1 and events.count("submitted") == 1, events
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == T1_OUTPUTS  # none missing, none twice
    # Each output file was stored by XNAT exactly once: nothing was uploaded again.
    assert len(xnat.stored) == 3 * len(T1_OUTPUTS), xnat.stored
    assert set(xnat.stored.values()) == {1}, xnat.stored
    # One History entry per job, ended Complete, with the scheduler's id.
    entries = xnat.workflows("hpcbridge/dcm2niix scan 4")
    assert sorted((w["jobID"], w["status"]) for w in entries) == [
        (i, "Complete") for i in ledger_ids
    ]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_resumes_with_one_job_and_one_upload_per_scan(
    kind: str,
    run_profile: Path,
    xnat: Xnat,
    isolated_home: Path,
    scheduler_queue: Any,
    bridge: Callable[..., Bridge],
    point: str,
) -> None:
    extra, moment, resume = KILL_POINTS[point]
    # A slow pass interval leaves a wide window between passes to kill the bridge in.
    running = bridge(*RUN_T1, *extra, "--wait", "--interval", "1")
    wait_for_ledger(running, moment, f"the {point} moment")
    running.kill()
    assert running.proc.returncode == -signal.SIGKILL
    at_kill = status_json(1)
    assert moment(at_kill), states(at_kill)  # it really was killed with work left
    assert at_kill["run"]["state"] == "active"

    if resume == "rerun":
        again = hb(*RUN_T1, *extra, "--wait", *FAST)
        assert again.returncode == 0, again.stderr
        assert again.stdout == "1\n"  # the same run, carried on
        assert "resuming run 1" in again.stderr
        assert "Traceback" not in again.stderr
    else:
        resumed = hb("sync", "--watch", *FAST)
        assert resumed.returncode == 0, resumed.stderr
        assert "Traceback" not in resumed.stderr
    assert_finished_exactly_once(xnat, isolated_home, run_profile, scheduler_queue)

    # Nothing is left to do: a further sync and the same run again submit nothing.
    later = hb("sync")
    assert later.returncode == 0, later.stderr
    again = cli(*RUN_T1)
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.stderr
    assert len(scheduler_queue.under(run_profile)) == 3


# --- 2: a failing job, then retry ------------------------------------------------------------


def test_a_failing_job_is_reported_with_its_log_and_retry_finishes_it(
    kind: str,
    run_profile: Path,
    xnat: Xnat,
    isolated_home: Path,
    scheduler_queue: Any,
    tmp_path: Path,
) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "flaky.toml").write_text(FLAKY_RECIPE)
    failed = hb(
        "run", "flaky", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes), "--wait", *FAST
    )
    assert failed.returncode == 3, failed.stderr  # partial success: scans failed
    assert failed.stdout == "1\n"
    assert "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1] == (
        "hpcbridge: error: run 1 ended with 3 of 3 scan(s) failed or cancelled "
        "(`hpcbridge status 1` shows why; `hpcbridge retry 1` tries them again)"
    )

    data = status_json(1)
    assert data["run"]["state"] == "done"
    assert states(data) == dict.fromkeys(T1_SCANS, "failed")
    first_ids = sorted(j["job_id"] for j in data["jobs"])
    for job in data["jobs"]:
        assert job["exit_code"] == 3
        assert job["error"] == "exit code 3"
        # the end of the job's log, read from the cluster's side over SSH
        assert "flaky: first attempt fails on purpose" in job["log_tail"]
    table = cli("status", "1")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[-1] == "3 failed"
    for scan in T1_SCANS:
        assert f"--- {scan}: exit code 3" in table.stderr
    assert table.stderr.count("flaky: first attempt fails on purpose") == 3
    for scan in T1_SCANS:
        assert xnat.files(scan, "LISTING") == []

    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert "run 1: retrying 3 job(s)" in retried.stderr
    assert retried.stderr.count("submitted as job") == 3
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    data = status_json(1)
    assert data["run"]["state"] == "done"
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    retry_ids = sorted(j["job_id"] for j in data["jobs"])
    assert not set(retry_ids) & set(first_ids)
    for job in data["jobs"]:
        assert job["attempts"] == 1
        assert job["exit_code"] == 0 and job["error"] is None and job["log_tail"] is None
    # The scheduler ran each scan twice: the failed attempt and the retry, nothing more.
    seen = scheduler_queue.under(run_profile)
    assert sorted((j.id, j.state) for j in seen) == sorted(
        [(i, "FAILED") for i in first_ids] + [(i, "COMPLETED") for i in retry_ids]
    ), seen
    assert per_folder(seen) == {j["work_dir"]: 2 for j in data["jobs"]}, seen
    for scan, job in zip(T1_SCANS, data["jobs"], strict=True):
        assert job["scan"] == scan
        assert xnat.files(scan, "LISTING") == sorted(["listing.txt", PROVENANCE_FILE])
        assert xnat.file(scan, "LISTING", "listing.txt").decode().split() == [
            f"{i:04d}.dcm" for i in range(1, 13)
        ]
        prov = json.loads(xnat.file(scan, "LISTING", PROVENANCE_FILE))
        assert prov["recipe"] == "flaky" and prov["recipe_version"] == "7"
        assert prov["job"]["id"] == job["job_id"]
        assert prov["job"]["scheduler"] == scheduler_name(kind)
    # XNAT's History: each scan's failed attempt stays Failed, its retry is Complete.
    entries = xnat.workflows("hpcbridge/flaky scan 4")
    assert sorted((w["jobID"], w["status"]) for w in entries) == sorted(
        [(i, "Failed") for i in first_ids] + [(i, "Complete") for i in retry_ids]
    ), entries
    for entry in entries:
        if entry["status"] == "Failed":
            assert "exit code 3" in entry["details"]

    nothing = cli("retry", "1")
    assert nothing.exit_code == 0
    assert "run 1 has no failed jobs to retry" in nothing.stderr
    assert len(scheduler_queue.under(run_profile)) == 6


# --- 3: --dry-run ----------------------------------------------------------------------------


def assert_dry_run_script(kind: str, script: str, work_root: Path, session: str) -> None:
    assert script.startswith("#!/bin/bash\n")
    assert script.count("#!/bin/bash") == 1  # one script, for the first scan to convert
    name = f"hbN_{session}_4"
    if kind in ("pbs", "pbspro"):
        assert f"#PBS -N {name}\n" in script and "#SBATCH" not in script
    else:
        assert f"#SBATCH --job-name={name}\n" in script and "#PBS" not in script
    assert f"HPCBRIDGE_WORK={work_root}/run-N/{session}/scans/4-Ax_3D_T1\n" in script
    assert "dcm2niix -z y -b y" in script


def test_dry_run_prints_the_plan_and_one_script_and_changes_nothing(
    kind: str,
    run_profile: Path,
    xnat: Xnat,
    isolated_home: Path,
    scheduler_queue: Any,
    tmp_path: Path,
) -> None:
    # Open (and cache) the XNAT session first, so that what follows is only the dry run.
    assert cli("ls", "PTV000").exit_code == 0
    home_before = tree(isolated_home)
    before = xnat.stats()
    dry = cli(*RUN_T1, "--dry-run")
    after = xnat.stats()
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert lines[0].split() == ["SCAN", "TYPE", "ACTION"]
    assert [line.split()[0] for line in lines[1:4]] == T1_SCANS
    assert all(line.endswith("convert") for line in lines[1:4])
    assert_dry_run_script(kind, "\n".join(lines[4:]), run_profile, "Haofei01_MR1")
    assert (
        f"3 scan(s) would be converted with dcm2niix on the {scheduler_name(kind)} scheduler; "
        "nothing was changed" in dry.stderr
    )
    assert f"# job script for {T1_SCANS[0]}:" in dry.stderr

    # Nothing written: no ledger, no job records, no staging, no work folder on the cluster...
    assert not ledger_path(load_settings()).exists()
    assert tree(isolated_home) == home_before
    assert not run_profile.exists()
    # ...nothing submitted...
    assert scheduler_queue.under(tmp_path) == []
    # ...and nothing written to XNAT, in the session already open.
    change = delta(before, after)
    assert change["sessions"] == 0
    assert {m: n for m, n in change.items() if m in ("PUT", "POST", "DELETE") and n} == {}
    assert change["GET"] >= 1
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == []
    assert xnat.workflows("hpcbridge/dcm2niix scan 4") == []

    # With a ledger holding a finished run: the dry run reads it and changes nothing in it.
    first = hb("run", "dcm2niix", "PTV000/Haofei01/Haofei01_MR1", "--scan", "4", "--wait", *FAST)
    assert first.returncode == 0, first.stderr
    ledger_before = ledger_dump()
    home_before = tree(isolated_home)
    work_before = tree(run_profile)
    queue_before = scheduler_queue.under(tmp_path)
    assert len(queue_before) == 1 and queue_before[0].name.endswith("_Haofei01_MR1_4")
    workflows_before = xnat.workflows("hpcbridge/dcm2niix scan 4")
    before = xnat.stats()
    dry = cli(*RUN_T1, "--dry-run")
    after = xnat.stats()
    assert dry.exit_code == 0, dry.output
    rows = {line.split()[0]: line for line in dry.stdout.splitlines()[1:4]}
    assert rows[T1_SCANS[0]].endswith("already converted by run 1 (use --force to redo)")
    assert rows[T1_SCANS[1]].endswith("convert") and rows[T1_SCANS[2]].endswith("convert")
    assert_dry_run_script(kind, "\n".join(dry.stdout.splitlines()[4:]), run_profile, "Haofei02_MR1")
    assert "2 scan(s) would be converted" in dry.stderr

    assert ledger_dump() == ledger_before
    assert tree(isolated_home) == home_before
    assert tree(run_profile) == work_before
    assert scheduler_queue.under(tmp_path) == queue_before
    change = delta(before, after)
    assert {m: n for m, n in change.items() if m in ("PUT", "POST", "DELETE") and n} == {}
    assert xnat.workflows("hpcbridge/dcm2niix scan 4") == workflows_before
    assert xnat.files(T1_SCANS[0], "NIFTI") == T1_OUTPUTS
    for scan in T1_SCANS[1:]:
        assert xnat.files(scan, "NIFTI") == []
