"""Runs end to end: `run`, `status`, `sync`, `retry` and `cancel --run` against a sandbox XNAT,
the local scheduler and the real dcm2niix. The dry run and a failing job with its retry are
written once for every scheduler: with the CI clusters (tests/cluster/) they run on qsub
(Slurm's PBS wrappers), sbatch and PBS Pro too, checked against the scheduler's own view.

Commands that wait (`run --wait`, `sync --watch`) run as subprocesses with a timeout, so a
run that never ends fails the test instead of hanging it; quick commands run in-process. Every
test has a fresh seeded sandbox and its own HPCBRIDGE_HOME; jobs and processes left over are
cancelled and killed (by id) at teardown.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import Result
from clusters import EVERY_SCHEDULER, SchedulerQueue, scheduler_of
from scenario import (
    PROVENANCE_FILE,
    RUN_T1,
    SUBJECTS,
    T1_OUTPUTS,
    T1_SCANS,
    WAIT_LIMIT,
    T,
    Xnat,
    assert_run_1_uploaded_once,
    cli,
    delta,
    hb,
    ledger_dump,
    per_folder,
    states,
    status_json,
    tree,
)

from hpcbridge.config import load_settings
from hpcbridge.ledger import Ledger, ledger_path
from hpcbridge.runs import RunRequest, start_run, wait_run
from hpcbridge.runs.sync import sync
from hpcbridge.sandbox import SandboxServer
from hpcbridge.schedulers.local import LocalScheduler
from hpcbridge.xnat import connect

FAST = ["--interval", "0.2"]
# The same for a scenario on a CI cluster, whose scheduler is slower to answer.
CLUSTER_T = 30
CLUSTER_WAIT_LIMIT = 120
CLUSTER_FAST = ["--interval", "0.3"]


# --- helpers ---------------------------------------------------------------------------------


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpcbridge: error: ")
    return lines[0]


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def sleep_until(deadline: float) -> Callable[[float], None]:
    """A sleep for wait_run that fails the test once ``deadline`` (monotonic) has passed."""

    def sleep(seconds: float) -> None:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(seconds)

    return sleep


def local_jobs(home: Path) -> list[dict[str, Any]]:
    """What the local scheduler was given to run, one record per submitted job."""
    root = home / "local-jobs"
    specs = sorted(root.glob("*/job.json"), key=lambda p: int(p.parent.name))
    return [json.loads(p.read_text()) for p in specs]


def local_state(home: Path, job_id: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((home / "local-jobs" / job_id / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # Only zombies left (our own children not yet reaped) counts as gone.
    return all(gone(p.pid) for p in psutil.process_iter() if _pgid(p.pid) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def write_recipe(folder: Path, name: str, command: str, resource: str = "RESULT") -> Path:
    """A lab recipe reading DICOM, uploading ``*.txt`` from its output folder to ``resource``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\nversion = "7"\n'
        '[inputs]\nresource = "DICOM"\n'
        f'[[outputs]]\nglob = "*.txt"\nresource = "{resource}"\n'
        f"[run]\ncommand = '''\n{command}\n'''\n"
    )
    return folder


# --- fixtures --------------------------------------------------------------------------------


def http_timeout(request: pytest.FixtureRequest) -> float:
    """The test's HTTP timeout: the cluster's, for a scenario on a cluster kind."""
    callspec = getattr(request.node, "callspec", None)
    local = callspec is None or callspec.params.get("kind", "local") == "local"
    return T if local else CLUSTER_T


@pytest.fixture()
def xnat(
    sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Xnat]:
    """The default profile pointed at a fresh sandbox of this test's own (a scenario on a
    cluster kind gets the cluster's longer HTTP timeout)."""
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    view = Xnat(sandbox, monkeypatch, timeout=http_timeout(request))
    yield view
    view.http.close()


@pytest.fixture(autouse=True)
def nothing_left_running(no_local_jobs_left: None) -> None:
    """Every test ends with no local job left running (tests/conftest.py)."""


class Bridge:
    """`hpcbridge run ... --wait` in the background, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpcbridge", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        """The first stderr line matching ``pattern``; fails at the end of output or time."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s: {self.seen}")
            if line is None:
                pytest.fail(f"the bridge ended without a line matching {pattern!r}: {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def kill(self) -> None:
        """SIGKILL, by its own pid: no cleanup, no last words."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=T)
        self._reader.join(timeout=T)


@pytest.fixture()
def bridge() -> Iterator[Callable[..., Bridge]]:
    started: list[Bridge] = []

    def start(*args: str) -> Bridge:
        started.append(Bridge(*args))
        return started[-1]

    yield start
    for b in started:
        b.kill()


# --- 1 and 2: the whole flow, one XNAT session, one status call per pass ----------------------


@pytest.mark.parametrize("kind", EVERY_SCHEDULER, indirect=True)
def test_run_wait_converts_every_t1_and_records_provenance(
    kind: str, run_profile: Path, xnat: Xnat, scheduler_queue: SchedulerQueue
) -> None:
    limit, fast = (WAIT_LIMIT, FAST) if kind == "local" else (CLUSTER_WAIT_LIMIT, CLUSTER_FAST)
    before = xnat.stats()
    done = hb(*RUN_T1, "--wait", *fast, timeout=limit)
    after = xnat.stats()
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"  # stdout is the run id, for scripts
    assert "run 1: 3 scan(s) planned" in done.stderr
    assert re.search(r"run 1: 3/3 ended \(uploaded 3\)", done.stderr)
    assert "Traceback" not in done.stderr

    # One XNAT session for the whole run: planning, three stage-ins, three stage-outs.
    assert delta(before, after)["sessions"] == 1
    assert delta(before, after).get("DELETE", 0) == 0  # nor ended and reopened on the way

    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == T1_OUTPUTS
        assert xnat.file(scan, "NIFTI", "Ax_3D_T1_4.nii.gz")[:2] == b"\x1f\x8b"  # gzip
        sidecar = xnat.json_file(scan, "NIFTI", "Ax_3D_T1_4.json")
        prov = xnat.json_file(scan, "NIFTI", PROVENANCE_FILE)
        assert prov["recipe"] == "dcm2niix"
        assert prov["recipe_version"] == "1"
        assert prov["parameters"] == {"gzip": True, "filename": "%p_%s", "bids": True}
        assert prov["source"] == {"scan": scan, "resource": "DICOM"}
        assert prov["run"] == 1
        assert prov["converter_version"]
        assert prov["converter_version"] == sidecar["ConversionSoftwareVersion"]
        assert prov["job"]["scheduler"] == scheduler_of(kind) and prov["job"]["exit_code"] == 0
        assert prov["files"] == ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz"]
        # The source DICOM is untouched.
        assert len(xnat.files(scan, "DICOM")) == 12

    data = status_json()
    assert data["run"]["state"] == "done"
    assert data["run"]["recipe"] == "dcm2niix" and data["run"]["target"] == "PTV000"
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    for job in data["jobs"]:
        assert job["exit_code"] == 0 and job["attempts"] == 0 and job["error"] is None
        assert sorted(u["name"] for u in job["uploaded"]) == T1_OUTPUTS
        assert {u["resource"] for u in job["uploaded"]} == {"NIFTI"}
    assert data["counts"]["uploaded"] == 3
    assert all(j["job_id"] for j in data["jobs"])  # the scheduler's ids are recorded
    for subject in SUBJECTS:
        files = {u["name"] for j in data["jobs"] if subject in j["scan"] for u in j["uploaded"]}
        assert {"Ax_3D_T1_4.nii.gz", "Ax_3D_T1_4.json", PROVENANCE_FILE} <= files
    assert len(scheduler_queue.under(run_profile)) == 3
    # the job ran on the scheduler's side of the transport, in the work_root
    assert list(run_profile.glob("run-*/Haofei01_MR1/scans/4-*/out/Ax_3D_T1_4.nii.gz"))
    # each job is in XNAT's history of its session, ended Complete, with the scheduler's id
    entries = {w["jobID"]: w for w in xnat.workflows("hpcbridge/dcm2niix scan 4")}
    for job in data["jobs"]:
        assert entries[job["job_id"]]["status"] == "Complete"

    table = cli("status")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith("run 1: dcm2niix over PTV000 (done, ")
    assert lines[1].split() == ["SCAN", "STATE", "JOB", "SUBMITTED", "ENDED", "EXIT", "OUTPUT"]
    rows = [line.split() for line in lines[2:5]]
    assert [r[0] for r in rows] == T1_SCANS
    assert all(r[1] == "uploaded" and r[-2:] == ["0", "NIFTI"] for r in rows)
    assert sorted(r[2] for r in rows) == sorted(j["job_id"] for j in data["jobs"])
    assert kind != "local" or sorted(r[2] for r in rows) == ["1", "2", "3"]
    assert lines[5:] == ["3 uploaded"]
    assert table.stderr == ""

    # a second run finds nothing left to do
    again = cli(*RUN_T1)
    assert again.exit_code == 0 and "nothing to do" in again.stderr


def test_one_scheduler_status_call_per_sync_pass_for_all_jobs(
    xnat: Xnat, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbridge.jobs import JobStore

    settings = load_settings()
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    before = xnat.stats()
    calls: list[int] = []
    live: list[int] = []
    # Reading the profile's live job records is done once per process, not once per pass.
    folder_reads: list[int] = []
    live_records = JobStore.live

    def counted(self: JobStore) -> Any:
        if self._live is None:
            folder_reads.append(1)
        return live_records(self)

    monkeypatch.setattr(JobStore, "live", counted)
    bounded_sleep = sleep_until(time.monotonic() + WAIT_LIMIT)

    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(settings, client, ledger, RunRequest("dcm2niix", "PTV000", ("4",)))
        assert plan.run is not None and len(plan.scans) == 3

        def on_pass(report: Any) -> None:
            calls.append(scheduler.status_calls)
            live.append(report.counts["submitted"] + report.counts["running"])

        report = wait_run(
            settings,
            client,
            ledger,
            scheduler,
            plan.run,
            interval=0.2,
            on_pass=on_pass,
            sleep=bounded_sleep,
        )
    assert report.counts["uploaded"] == 3, report
    per_pass = [b - a for a, b in zip([0, *calls], calls, strict=False)]
    # The first pass submits (nothing to poll yet); every later pass polls all three jobs in
    # one call, however many of them are still queued or running.
    assert per_pass[0] == 0
    assert len(per_pass) >= 2 and all(n == 1 for n in per_pass[1:]), per_pass
    assert live[0] == 3  # all three were in the scheduler together, polled together
    assert delta(before, xnat.stats())["sessions"] == 1
    assert len(folder_reads) == 1, f"{len(folder_reads)} reads of all job records"


# --- 3: --dry-run, on every scheduler --------------------------------------------------------


def assert_dry_run_script(kind: str, script: str, work_root: Path, session: str) -> None:
    assert script.startswith("#!/bin/bash\n")
    assert script.count("#!/bin/bash") == 1  # one script, for the first scan to convert
    name = f"hbN_{session}_4"
    if kind in ("pbs", "pbspro"):
        assert f"#PBS -N {name}\n" in script and "#SBATCH" not in script
    elif kind == "slurm":
        assert f"#SBATCH --job-name={name}\n" in script and "#PBS" not in script
    else:
        assert name in script and "#PBS" not in script and "#SBATCH" not in script
    assert f"HPCBRIDGE_WORK={work_root}/run-N/{session}/scans/4-Ax_3D_T1\n" in script
    assert "dcm2niix -z y -b y" in script


@pytest.mark.parametrize("kind", EVERY_SCHEDULER, indirect=True)
def test_dry_run_prints_the_plan_and_one_script_and_changes_nothing(
    kind: str,
    run_profile: Path,
    xnat: Xnat,
    isolated_home: Path,
    scheduler_queue: SchedulerQueue,
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
        f"3 scan(s) would be converted with dcm2niix on the {scheduler_of(kind)} scheduler; "
        "nothing was changed" in dry.stderr
    )
    assert "nothing was changed" in dry.stderr
    assert f"# job script for {T1_SCANS[0]}:" in dry.stderr

    # Nothing written: no ledger, no job records, no staging, no work folder...
    assert not ledger_path(load_settings()).exists()
    assert not (isolated_home / "local-jobs").exists()
    assert not (isolated_home / "work").exists()
    assert not (isolated_home / "jobs").exists()
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
    limit, fast = (WAIT_LIMIT, FAST) if kind == "local" else (CLUSTER_WAIT_LIMIT, CLUSTER_FAST)
    session = "PTV000/Haofei01/Haofei01_MR1"
    first = hb("run", "dcm2niix", session, "--scan", "4", "--wait", *fast, timeout=limit)
    assert first.returncode == 0, first.stderr
    ledger_before = ledger_dump()
    home_before = tree(isolated_home)
    work_before = tree(run_profile)
    queue_before = scheduler_queue.under(tmp_path)
    assert len(queue_before) == 1
    # A cluster's scheduler knows the job by hpcbridge's name; the local one by its script's.
    assert kind == "local" or queue_before[0].name.endswith("_Haofei01_MR1_4")
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


# --- 4: re-runs ------------------------------------------------------------------------------


def test_a_second_run_skips_converted_scans_and_force_redoes_them(
    xnat: Xnat, isolated_home: Path
) -> None:
    session = ["PTV000/Haofei01/Haofei01_MR1", "--scan", "4"]
    first = hb("run", "dcm2niix", *session, "--wait", *FAST)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "1\n"

    # The same again: nothing to do, no new run, nothing submitted or uploaded.
    before = xnat.stats()
    again = cli("run", "dcm2niix", *session, "--wait", *FAST)
    assert again.exit_code == 0, again.output
    assert again.stdout == ""
    assert "PTV000/Haofei01/Haofei01_MR1/4: skipped, already converted by run 1" in again.stderr
    assert "nothing to do" in again.stderr
    assert delta(before, xnat.stats()).get("PUT", 0) == 0
    assert len(local_jobs(isolated_home)) == 1
    with Ledger.for_settings(load_settings()) as ledger:
        assert [r.id for r in ledger.runs()] == [1]

    # A dry run says so too.
    dry = cli("run", "dcm2niix", *session, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "already converted by run 1 (use --force to redo)" in dry.stdout
    assert "0 scan(s) would be converted" in dry.stderr

    # Other parameters are another conversion: not skipped.
    other = cli("run", "dcm2niix", *session, "--set", "gzip=false", "--dry-run")
    assert "convert" in other.stdout.splitlines()[1]

    forced = hb("run", "dcm2niix", *session, "--force", "--wait", *FAST)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == "2\n"
    assert "skipped" not in forced.stderr
    assert states(status_json(2)) == {T1_SCANS[0]: "uploaded"}
    assert len(local_jobs(isolated_home)) == 2
    assert xnat.files(T1_SCANS[0], "NIFTI") == T1_OUTPUTS
    assert xnat.json_file(T1_SCANS[0], "NIFTI", PROVENANCE_FILE)["run"] == 2


# --- 5: kill -9 and resume -------------------------------------------------------------------


def assert_finished_exactly_once(xnat: Xnat, home: Path) -> None:
    """Every T1 uploaded once, by one job each, with nothing submitted or uploaded twice."""
    data = assert_run_1_uploaded_once(xnat)
    submitted = local_jobs(home)
    assert len(submitted) == 3, submitted  # no duplicate submissions
    assert sorted(j["job_id"] for j in data["jobs"]) == sorted(j["id"] for j in submitted)
    assert sorted(j["work_dir"] for j in data["jobs"]) == sorted(j["work_dir"] for j in submitted)


@pytest.mark.parametrize(
    "kill_after",
    [
        r"run 1: 3 scan\(s\) planned",
        r"Haofei01_MR1/4: submitted as job",
        r"Haofei01_MR1/4: uploaded",
    ],
    ids=["planned", "first-submitted", "first-uploaded"],
)
def test_a_killed_run_is_finished_by_sync_with_nothing_done_twice(
    xnat: Xnat, isolated_home: Path, bridge: Callable[..., Bridge], kill_after: str
) -> None:
    running = bridge(*RUN_T1, "--wait", *FAST)
    running.wait_for(kill_after)
    running.kill()
    assert running.proc.returncode == -signal.SIGKILL

    resumed = hb("sync", "--watch", *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_finished_exactly_once(xnat, isolated_home)

    # A further sync finds nothing to do.
    later = hb("sync")
    assert later.returncode == 0, later.stderr
    assert len(local_jobs(isolated_home)) == 3


def test_a_killed_run_resumes_when_the_same_run_command_is_repeated(
    xnat: Xnat, isolated_home: Path, bridge: Callable[..., Bridge]
) -> None:
    running = bridge(*RUN_T1, "--wait", *FAST)
    running.wait_for(r"submitted as job")
    running.kill()

    again = hb(*RUN_T1, "--wait", *FAST)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "1\n"  # the same run, carried on
    assert "resuming run 1" in again.stderr
    assert_finished_exactly_once(xnat, isolated_home)


class Crash(BaseException):
    """The bridge dying at one precise point (not an error anything may catch)."""


def test_a_job_submitted_just_before_a_crash_is_adopted_not_submitted_again(
    xnat: Xnat, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest window: the scheduler took the job, the ledger never heard of it."""
    settings = load_settings()
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    bounded_sleep = sleep_until(time.monotonic() + WAIT_LIMIT)

    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(settings, client, ledger, RunRequest("dcm2niix", "PTV000", ("4",)))
        assert plan.run is not None
        transition = ledger.transition

        def crash_on_submitted(job_id: int, to: Any, **kwargs: Any) -> Any:
            if str(to) == "submitted":
                raise Crash
            return transition(job_id, to, **kwargs)

        monkeypatch.setattr(ledger, "transition", crash_on_submitted)
        with pytest.raises(Crash):
            sync(settings, client, ledger, scheduler, plan.run)
        monkeypatch.setattr(ledger, "transition", transition)
        assert len(local_jobs(isolated_home)) == 1  # in the scheduler, not in the ledger
        assert ledger.jobs(plan.run.id)[0].state.value == "staged"

        report = wait_run(
            settings, client, ledger, scheduler, plan.run, interval=0.2, sleep=bounded_sleep
        )
    assert report.counts["uploaded"] == 3, report
    assert_finished_exactly_once(xnat, isolated_home)


def test_a_job_the_scheduler_took_but_no_record_of_ours_holds_is_found_in_the_scheduler(
    xnat: Xnat, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Narrower still: qsub answered, then the bridge died before writing its job record.
    The next pass asks the scheduler (here: the local one, by work folder) before submitting."""
    from hpcbridge import jobs as jobs_module

    settings = load_settings()
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    bounded_sleep = sleep_until(time.monotonic() + WAIT_LIMIT)

    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(settings, client, ledger, RunRequest("dcm2niix", "PTV000", ("4",)))
        assert plan.run is not None

        save = jobs_module.JobStore.save

        def crash(self: Any, job: Any) -> None:
            raise Crash

        monkeypatch.setattr(jobs_module.JobStore, "save", crash)
        with pytest.raises(Crash):
            sync(settings, client, ledger, scheduler, plan.run)
        monkeypatch.setattr(jobs_module.JobStore, "save", save)
        assert len(local_jobs(isolated_home)) == 1
        assert not list((isolated_home / "jobs").glob("*/*.json"))  # no record of ours

        report = wait_run(
            settings, client, ledger, scheduler, plan.run, interval=0.2, sleep=bounded_sleep
        )
    assert report.counts["uploaded"] == 3, report
    assert_finished_exactly_once(xnat, isolated_home)


# --- 6: a failing job and retry, on every scheduler ------------------------------------------

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


@pytest.mark.parametrize("kind", EVERY_SCHEDULER, indirect=True)
def test_a_failing_job_is_reported_with_its_log_and_retry_finishes_it(
    kind: str,
    run_profile: Path,
    xnat: Xnat,
    scheduler_queue: SchedulerQueue,
    tmp_path: Path,
) -> None:
    limit, fast = (WAIT_LIMIT, FAST) if kind == "local" else (CLUSTER_WAIT_LIMIT, CLUSTER_FAST)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "flaky.toml").write_text(FLAKY_RECIPE)
    args = ["run", "flaky", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes)]
    failed = hb(*args, "--wait", *fast, timeout=limit)
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
        # the end of the job's log, read from the scheduler's side (over SSH on a cluster)
        assert "flaky: first attempt fails on purpose" in job["log_tail"]
    table = cli("status", "1")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[-1] == "3 failed"
    for scan in T1_SCANS:
        assert f"--- {scan}: exit code 3" in table.stderr
    assert table.stderr.count("flaky: first attempt fails on purpose") == 3
    for scan in T1_SCANS:
        assert xnat.files(scan, "LISTING") == []

    # At once: the local scheduler fails a job fast enough for its retry to launch within the
    # same second, and the retry still gets History entries of its own.
    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert "run 1: retrying 3 job(s)" in retried.stderr
    assert retried.stderr.count("submitted as job") == 3
    done = hb("sync", "1", "--watch", *fast, timeout=limit)
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
        prov = xnat.json_file(scan, "LISTING", PROVENANCE_FILE)
        assert prov["recipe"] == "flaky" and prov["recipe_version"] == "7"
        assert prov["parameters"] == {} and prov["converter_version"] is None
        assert prov["job"]["id"] == job["job_id"]
        assert prov["job"]["scheduler"] == scheduler_of(kind)
    # XNAT's History: each scan's failed attempt stays Failed, its retry is Complete.
    entries = xnat.workflows("hpcbridge/flaky scan 4")
    assert sorted((w["jobID"], w["status"]) for w in entries) == sorted(
        [(i, "Failed") for i in first_ids] + [(i, "Complete") for i in retry_ids]
    ), entries
    for entry in entries:
        if entry["status"] == "Failed":
            assert "exit code 3" in entry["details"]

    # Nothing left to retry.
    nothing = cli("retry", "1")
    assert nothing.exit_code == 0
    assert "run 1 has no failed jobs to retry" in nothing.stderr
    assert len(scheduler_queue.under(run_profile)) == 6  # three that failed, three retries


def test_a_recipe_sees_the_scan_variables_its_docs_promise(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipes = write_recipe(
        tmp_path / "recipes",
        "who",
        "echo {{ scan.project }} {{ scan.subject }} {{ scan.experiment }} {{ scan.id }} "
        "{{ scan.type }} > {{ output_dir }}/who.txt",
        resource="WHO",
    )
    done = hb("run", "who", T1_SCANS[0], "--recipes", str(recipes), "--wait", *FAST)
    assert done.returncode == 0, done.stderr
    who = xnat.file(T1_SCANS[0], "WHO", "who.txt").decode()
    assert who == "PTV000 Haofei01 Haofei01_MR1 4 Ax 3D T1\n"


# --- 7: cancel -------------------------------------------------------------------------------


def test_cancel_run_stops_every_job_and_sync_then_does_nothing(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipes = write_recipe(tmp_path / "recipes", "sleepy", "sleep 120")
    started = cli("run", "sleepy", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes))
    assert started.exit_code == 0, started.output
    assert started.stdout == "1\n"
    assert started.stderr.count("submitted as job") == 3

    def running() -> list[dict[str, Any]]:
        found = [local_state(isolated_home, j["id"]) for j in local_jobs(isolated_home)]
        return [s for s in found if s.get("state") == "running" and s.get("pgid")]

    eventually(lambda: len(running()) >= 1, "a job to start")
    groups = [int(s["pgid"]) for s in running()]
    runners = [
        int((isolated_home / "local-jobs" / j["id"] / "runner.pid").read_text())
        for j in local_jobs(isolated_home)
    ]

    cancelled = cli("cancel", "--run", "1")
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout == "run 1: cancelled 3 job(s)\n"

    data = status_json(1)
    assert data["run"]["state"] == "cancelled"
    assert states(data) == dict.fromkeys(T1_SCANS, "cancelled")
    eventually(lambda: all(group_gone(g) for g in groups), f"the job processes {groups} to end")
    eventually(lambda: all(gone(p) for p in runners), f"the local runners {runners} to exit")
    finals = {local_state(isolated_home, j["id"]).get("state") for j in local_jobs(isolated_home)}
    assert finals == {"cancelled"}

    # The run is over: sync submits nothing, uploads nothing and changes no state.
    before = xnat.stats()
    after_sync = cli("sync", "1")
    assert after_sync.exit_code == 3, after_sync.output  # ended, with scans cancelled
    assert "run 1 ended with 3 of 3 scan(s) failed or cancelled" in after_sync.stderr
    assert "submitted" not in after_sync.stderr
    assert len(local_jobs(isolated_home)) == 3
    assert status_json(1)["run"]["state"] == "cancelled"
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "cancelled")
    assert delta(before, xnat.stats()).get("PUT", 0) == 0
    for scan in T1_SCANS:
        assert xnat.files(scan, "RESULT") == []


# --- 8: a scan that cannot be staged in ------------------------------------------------------


def test_a_scan_without_dicom_fails_while_the_others_upload(
    xnat: Xnat, isolated_home: Path
) -> None:
    session = "PTV000/Haofei01/Haofei01_MR1"
    done = hb("run", "dcm2niix", session, "--scan", "4", "--scan", "99", "--wait", *FAST)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "1\n"
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("hpcbridge: error: run 1 ended with 1 of 2 scan(s) failed")
    assert "`hpcbridge status 1` shows why" in last
    # The failure is said once, naming the scan once.
    error = f"{session}/99: failed: resource DICOM holds no DICOM (1 other file(s))"
    assert done.stderr.count("holds no DICOM") == 1, done.stderr
    assert f"  {error}\n" in done.stderr

    data = status_json(1)
    assert states(data) == {f"{session}/4": "uploaded", f"{session}/99": "failed"}
    bad = next(j for j in data["jobs"] if j["scan"].endswith("/99"))
    assert bad["error"] == "resource DICOM holds no DICOM (1 other file(s))"
    assert bad["job_id"] is None  # never submitted
    assert len(local_jobs(isolated_home)) == 1
    assert xnat.files(f"{session}/4", "NIFTI") == T1_OUTPUTS
    assert xnat.files(f"{session}/99", "NIFTI") == []

    table = cli("status")
    assert table.stdout.splitlines()[-1] == "1 uploaded, 1 failed"
    assert f"--- {session}/99: resource DICOM holds no DICOM" in table.stderr


# --- 9: errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "nope", "PTV000"], 1, "no recipe named 'nope'"),
        (
            ["run", "dcm2niix", "PTV000", "--scan-type", "nope*"],
            1,
            "no scan below PTV000 matches nope* (`hpcbridge ls PTV000` shows what is there)",
        ),
        (
            ["run", "dcm2niix", "PTV000", "--set", "nope=1"],
            1,
            "recipe dcm2niix has no parameter 'nope' (parameters: gzip, filename, bids)",
        ),
        (["run", "dcm2niix", "PTV000", "--set", "gzip=maybe"], 1, "gzip"),
        (["run", "dcm2niix", "NOPE000"], 1, "NOPE000"),
        (["status", "999"], 1, "no run 999"),
        (["sync", "999"], 1, "no run 999"),
        (["retry", "999"], 1, "no run 999"),
        (["cancel", "--run", "999"], 1, "no run 999"),
        (["status"], 2, "no runs yet"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_errors_are_one_line_with_the_right_exit_code(
    xnat: Xnat, isolated_home: Path, args: list[str], code: int, message: str
) -> None:
    before = xnat.stats()
    result = cli(*args)
    line = one_line_error(result, code)
    assert message in line
    # Nothing was started or written.
    assert not (isolated_home / "local-jobs").exists()
    assert not (isolated_home / "work").exists()
    assert delta(before, xnat.stats()).get("PUT", 0) == 0
    if ledger_path(load_settings()).exists():
        with Ledger.for_settings(load_settings()) as ledger:
            assert ledger.runs() == []
