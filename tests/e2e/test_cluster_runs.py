"""Whole runs on the CI cluster, through SSH, on qsub (Slurm's PBS wrappers), sbatch and PBS
Pro: a bridge killed with SIGKILL part-way, at a moment the ledger shows, and resumed.

What hpcbridge says is checked against what the scheduler saw (squeue, qstat) and what XNAT
(the sandbox, in this process) stored. Commands that wait run as subprocesses with a timeout;
quick ones run in-process. Jobs a test leaves in the queue are cancelled by id and bridge
processes killed by pid at teardown. (A failing job and `retry`, and `--dry-run`, are
tests/integration/test_runs.py's, written once for the local scheduler and the clusters.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scenario import (
    RUN_T1,
    SUBJECTS,
    Done,
    Xnat,
    assert_run_1_uploaded_once,
    bridge_env,
    cli,
    job_records,
    per_folder,
    states,
    status_json,
)
from scenario import hb as scenario_hb

from hpcbridge.sandbox import SandboxServer

pytestmark = pytest.mark.e2e

T = 30  # seconds for one HTTP request or one quick command of the test itself
WAIT_LIMIT = 120  # seconds a waiting command may take before the test fails
FAST = ["--interval", "0.3"]
IN_SCHEDULER = ("submitted", "running", "finished")


# --- helpers ---------------------------------------------------------------------------------


def hb(*args: str, timeout: float = WAIT_LIMIT) -> Done:
    """scenario.hb, with the cluster's longer wait."""
    return scenario_hb(*args, timeout=timeout)


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
    view = Xnat(sandbox, monkeypatch, timeout=T)
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
    data = assert_run_1_uploaded_once(xnat)
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
