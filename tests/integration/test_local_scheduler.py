"""The local scheduler and hpcbridge.jobs against real processes.

Jobs are rendered from a tiny recipe whose command each test writes. Tests that need a job to
stay alive for a while make it wait for a "gate" file the test creates, so nothing depends on
how fast this machine is; every wait is bounded and ends by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from hpcbridge import recipes
from hpcbridge.cli import hints
from hpcbridge.errors import SchedulerError
from hpcbridge.jobs import Job, JobStore, cancel_jobs, refresh, submit_script, wait_for
from hpcbridge.schedulers.base import JobStatus, State
from hpcbridge.schedulers.local import LocalScheduler
from hpcbridge.schedulers.script import parse_script

# A job body that waits (at most 60 s) until the test creates $HPCBRIDGE_WORK/gate.
WAIT_FOR_GATE = 'for _ in $(seq 600); do [ -e "$HPCBRIDGE_WORK/gate" ] && break; sleep 0.1; done'
# Precise start and end times, written by the job itself.
T_START = 'date +%s.%N > "$HPCBRIDGE_WORK/t_start"'
T_END = 'date +%s.%N > "$HPCBRIDGE_WORK/t_end"'


def job_script(
    tmp_path: Path, name: str, body: str, *, walltime: str = "00:10:00", work: Path | None = None
) -> Path:
    """A local job script rendered by hpcbridge whose command is ``body``."""
    recipe_file = tmp_path / "recipes" / f"{name}.toml"
    recipe_file.parent.mkdir(exist_ok=True)
    recipe_file.write_text(
        f'name = "{name}"\n[resources]\nwalltime = "{walltime}"\n'
        f"[run]\ncommand = '''\n{body}\n'''\n"
    )
    text = recipes.render_script(
        recipes.load_recipe(recipe_file),
        "local",
        values={},
        input_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / "out" / name),
        work_dir=str(work or tmp_path / "work" / name),
    )
    script = tmp_path / "scripts" / f"{name}.sh"
    script.parent.mkdir(exist_ok=True)
    script.write_text(text)
    return script


def state_dir(job: Job) -> Path:
    assert job.work_dir is not None
    return Path(job.work_dir) / ".hpcbridge"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def open_gate(job: Job) -> None:
    assert job.work_dir is not None
    (Path(job.work_dir) / "gate").touch()


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def runner_pid(sched: LocalScheduler, job_id: str) -> int:
    path = sched.root / job_id / "runner.pid"
    eventually(path.exists, f"runner.pid of job {job_id}")
    return int(path.read_text())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _all_ids(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []


@pytest.fixture()
def make_sched(isolated_home: Path) -> Iterator[Callable[..., LocalScheduler]]:
    """LocalSchedulers on the CLI's root; every job left is cancelled and its runner awaited."""
    root = isolated_home / "local-jobs"

    def make(max_jobs: int = 4) -> LocalScheduler:
        return LocalScheduler(root, max_jobs=max_jobs)

    yield make
    sched = make()
    ids = _all_ids(root)
    if ids:
        sched.cancel(ids)
        pids = [int(p.read_text()) for i in ids if (p := root / i / "runner.pid").exists()]
        for pid in pids:
            eventually(lambda pid=pid: gone(pid), f"runner {pid} to exit", timeout=30)


@pytest.fixture()
def sched(make_sched: Callable[..., LocalScheduler]) -> LocalScheduler:
    return make_sched(4)


@pytest.fixture()
def store(isolated_home: Path) -> JobStore:
    return JobStore(isolated_home, "default")


def wait(store: JobStore, sched: LocalScheduler, *jobs: Job) -> dict[str, Job]:
    done = wait_for(store, sched, [j.native_id for j in jobs], interval=0.1, timeout=30)
    return {j.native_id: j for j in done}


def local_status(sched: LocalScheduler, job_id: str) -> JobStatus:
    return sched.status([job_id])[job_id]


def settled(sched: LocalScheduler, job_id: str) -> JobStatus:
    """The scheduler's own final word on a job, once its runner has given it."""
    eventually(lambda: local_status(sched, job_id).state.is_final, f"job {job_id} to end")
    return local_status(sched, job_id)


# --- success and failure ----------------------------------------------------------------------


def test_a_job_that_succeeds(tmp_path: Path, sched: LocalScheduler, store: JobStore) -> None:
    script = job_script(tmp_path, "ok", 'echo "result" > "$HPCBRIDGE_WORK/result.txt"')
    job = submit_script(store, sched, script)
    assert job.state == "queued" and job.scheduler == "local"
    assert job.script == str(state_dir(job) / "job.sh")
    done = wait(store, sched, job)[job.native_id]
    assert (done.state, done.exit_code, done.reason) == ("finished", 0, "")
    assert done.end is not None
    assert (Path(done.work_dir or "") / "result.txt").read_text() == "result\n"
    status = read_json(state_dir(job) / "status.json")
    assert status["exit_code"] == 0 and status["job_id"] == job.native_id
    assert settled(sched, job.native_id).state is State.FINISHED
    assert store.get(job.native_id) == done  # the record on disk says the same


def test_a_job_that_exits_3_is_failed_with_its_log_tail(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    body = "echo starting\necho 'dcm2niix: no DICOM files in input' >&2\nexit 3"
    job = submit_script(store, sched, job_script(tmp_path, "bad", body))
    done = wait(store, sched, job)[job.native_id]
    assert (done.state, done.exit_code) == ("failed", 3)
    assert done.reason == "exit code 3"
    assert "dcm2niix: no DICOM files in input" in done.log_tail
    assert read_json(state_dir(job) / "status.json")["exit_code"] == 3
    status = settled(sched, job.native_id)
    assert (status.state, status.exit_code) == (State.FAILED, 3)


def test_a_hand_written_script_is_judged_by_the_scheduler(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/bash\necho fine > ok.txt\n")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\necho 'hand-written failure' >&2\nexit 5\n")
    job_ok = submit_script(store, sched, ok)
    job_bad = submit_script(store, sched, bad)
    assert job_ok.work_dir is None and job_ok.script == str(ok)  # submitted in place
    done = wait(store, sched, job_ok, job_bad)
    assert (done[job_ok.native_id].state, done[job_ok.native_id].exit_code) == ("finished", 0)
    assert (tmp_path / "ok.txt").read_text() == "fine\n"  # ran next to the script
    assert (done[job_bad.native_id].state, done[job_bad.native_id].exit_code) == ("failed", 5)
    assert "hand-written failure" in done[job_bad.native_id].log_tail


# --- jobs outlive the CLI ---------------------------------------------------------------------


def test_jobs_keep_running_after_the_submitting_process_exits(
    tmp_path: Path, sched: LocalScheduler, store: JobStore, isolated_home: Path
) -> None:
    script = job_script(tmp_path, "long", f'{WAIT_FOR_GATE}\necho survived > "$HPCBRIDGE_WORK/out"')
    cli = subprocess.run(
        [sys.executable, "-m", "hpcbridge", "submit", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, HPCBRIDGE_HOME=str(isolated_home)),
    )
    assert cli.returncode == 0, cli.stderr
    job_id = cli.stdout.strip()
    assert job_id.isdigit()
    # The CLI has exited; its job is still there, waiting for the gate.
    job = store.get(job_id)
    assert job is not None
    eventually(lambda: (state_dir(job) / "started.json").exists(), "the job to start")
    assert local_status(sched, job_id).state is State.RUNNING
    assert refresh(store, sched).jobs[0].state == "running"
    open_gate(job)
    done = wait(store, sched, job)[job_id]
    assert (done.state, done.exit_code) == ("finished", 0)
    assert (tmp_path / "work" / "long" / "out").read_text() == "survived\n"


# --- concurrency limit ------------------------------------------------------------------------


def test_with_one_slot_the_second_job_waits_for_the_first(
    tmp_path: Path, make_sched: Callable[..., LocalScheduler], store: JobStore
) -> None:
    sched = make_sched(max_jobs=1)
    first = submit_script(
        store, sched, job_script(tmp_path, "first", f"{T_START}\n{WAIT_FOR_GATE}\n{T_END}")
    )
    second = submit_script(store, sched, job_script(tmp_path, "second", f"{T_START}\n{T_END}"))
    eventually(lambda: (state_dir(first) / "started.json").exists(), "the first job to start")
    # While the first holds the only slot, the second stays queued and does not start.
    for _ in range(5):
        time.sleep(0.1)
        assert local_status(sched, second.native_id).state is State.QUEUED
        assert not (state_dir(second) / "started.json").exists()
    assert {j.native_id: j.state for j in refresh(store, sched).jobs} == {
        first.native_id: "running",
        second.native_id: "queued",
    }
    open_gate(first)
    done = wait(store, sched, first, second)
    assert [done[j.native_id].state for j in (first, second)] == ["finished", "finished"]
    first_end = float((tmp_path / "work" / "first" / "t_end").read_text())
    second_start = float((tmp_path / "work" / "second" / "t_start").read_text())
    assert second_start >= first_end
    started = read_json(state_dir(second) / "started.json")["start"]
    assert started >= read_json(state_dir(first) / "status.json")["end"]


def test_two_slots_run_two_jobs_at_once(
    tmp_path: Path, make_sched: Callable[..., LocalScheduler], store: JobStore
) -> None:
    sched = make_sched(max_jobs=2)
    jobs = [
        submit_script(store, sched, job_script(tmp_path, f"par{i}", WAIT_FOR_GATE))
        for i in range(3)
    ]
    started = [lambda j=j: (state_dir(j) / "started.json").exists() for j in jobs]
    eventually(lambda: started[0]() and started[1](), "two jobs to run side by side")
    assert local_status(sched, jobs[2].native_id).state is State.QUEUED
    for job in jobs:
        open_gate(job)
    assert all(j.state == "finished" for j in wait(store, sched, *jobs).values())


# --- dependencies -----------------------------------------------------------------------------


def test_afterok_runs_b_after_a(tmp_path: Path, sched: LocalScheduler, store: JobStore) -> None:
    a_body = f"{T_START}\n{WAIT_FOR_GATE}\n{T_END}"
    a = submit_script(store, sched, job_script(tmp_path, "a", a_body))
    b = submit_script(store, sched, job_script(tmp_path, "b", T_START), after=[a.native_id])
    assert b.after == [a.native_id]
    eventually(lambda: (state_dir(a) / "started.json").exists(), "A to start")
    time.sleep(0.3)
    assert local_status(sched, b.native_id).state is State.QUEUED  # four free slots, yet B waits
    assert not (state_dir(b) / "started.json").exists()
    open_gate(a)
    done = wait(store, sched, a, b)
    assert (done[a.native_id].state, done[b.native_id].state) == ("finished", "finished")
    assert float((tmp_path / "work/b/t_start").read_text()) >= float(
        (tmp_path / "work/a/t_end").read_text()
    )
    assert (
        read_json(state_dir(b) / "started.json")["start"]
        >= read_json(state_dir(a) / "status.json")["end"]
    )


def test_when_a_fails_b_is_cancelled_naming_a(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    a = submit_script(store, sched, job_script(tmp_path, "a", f"{WAIT_FOR_GATE}\nexit 3"))
    b = submit_script(store, sched, job_script(tmp_path, "b", "echo never"), after=[a.native_id])
    open_gate(a)
    done = wait(store, sched, a, b)
    assert (done[a.native_id].state, done[a.native_id].exit_code) == ("failed", 3)
    assert done[b.native_id].state == "cancelled"
    # Whoever noticed first (hpcbridge's poll or the local runner) names the failed job.
    reason = done[b.native_id].reason
    assert f"job {a.native_id} " in reason or f"dependency {a.native_id} " in reason
    assert not (state_dir(b) / "started.json").exists()
    assert not (tmp_path / "work" / "b" / ".hpcbridge" / "job.out").exists()
    assert settled(sched, b.native_id).state is State.CANCELLED


def test_the_scheduler_alone_cancels_a_job_whose_dependency_failed(
    tmp_path: Path, sched: LocalScheduler
) -> None:
    # No hpcbridge.jobs polling at all: the runner of B must give up by itself.
    a_script = job_script(tmp_path, "a", "exit 3")
    b_script = job_script(tmp_path, "b", "echo never")
    a = sched.submit(str(a_script), info=parse_script(a_script.read_text()))
    b = sched.submit(str(b_script), after=[a], info=parse_script(b_script.read_text()))
    assert settled(sched, a).state is State.FAILED
    status = settled(sched, b)
    assert status.state is State.CANCELLED
    assert status.reason == f"dependency {a} did not succeed (failed)"


def test_a_failing_head_cancels_the_whole_chain(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    a = submit_script(store, sched, job_script(tmp_path, "a", f"{WAIT_FOR_GATE}\nexit 3"))
    b = submit_script(store, sched, job_script(tmp_path, "b", "echo b"), after=[a.native_id])
    c = submit_script(store, sched, job_script(tmp_path, "c", "echo c"), after=[b.native_id])
    open_gate(a)
    done = wait(store, sched, a, b, c)
    assert [done[j.native_id].state for j in (a, b, c)] == ["failed", "cancelled", "cancelled"]
    assert a.native_id in done[b.native_id].reason
    assert b.native_id in done[c.native_id].reason
    for job in (b, c):
        assert not (state_dir(job) / "started.json").exists()
        assert settled(sched, job.native_id).state is State.CANCELLED


def test_after_a_job_that_already_failed_is_refused(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    a = submit_script(store, sched, job_script(tmp_path, "a", "exit 3"))
    assert wait(store, sched, a)[a.native_id].state == "failed"
    with pytest.raises(SchedulerError, match=f"job {a.native_id} already failed"):
        submit_script(store, sched, job_script(tmp_path, "b", "echo b"), after=[a.native_id])
    assert [j.native_id for j in store.all()] == [a.native_id]  # nothing was submitted


def test_after_a_failed_job_is_refused_even_before_anyone_polled_it(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    a = submit_script(store, sched, job_script(tmp_path, "a", "exit 3"))
    assert settled(sched, a.native_id).state is State.FAILED
    assert store.get(a.native_id).state == "queued"  # type: ignore[union-attr]  # not polled yet
    with pytest.raises(SchedulerError, match=f"job {a.native_id} already failed"):
        submit_script(store, sched, job_script(tmp_path, "b", "echo b"), after=[a.native_id])


def test_after_an_id_the_scheduler_never_issued_is_refused(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    script = job_script(tmp_path, "b", "echo b")
    with pytest.raises(SchedulerError, match="cannot depend on job 77"):
        submit_script(store, sched, script, after=["77"])
    with pytest.raises(SchedulerError, match="not local job ids: 'abc.pbs'"):
        submit_script(store, sched, script, after=["abc.pbs"])
    assert store.all() == []


# --- arrays -----------------------------------------------------------------------------------


def test_an_array_job_runs_every_index(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    body = 'echo "task $HPCBRIDGE_ARRAY_INDEX" > "$HPCBRIDGE_WORK/task.$HPCBRIDGE_ARRAY_INDEX"'
    job = submit_script(store, sched, job_script(tmp_path, "arr", body), array="1-3")
    assert job.array == "1-3"
    done = wait(store, sched, job)[job.native_id]
    assert (done.state, done.exit_code) == ("finished", 0)
    for i in (1, 2, 3):
        assert read_json(state_dir(job) / f"status.{i}.json")["exit_code"] == 0
        assert (tmp_path / "work" / "arr" / f"task.{i}").read_text() == f"task {i}\n"
    assert not (state_dir(job) / "status.json").exists()
    assert not (tmp_path / "work" / "arr" / "task.4").exists()


def test_an_array_with_one_failing_index_fails(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    body = '[ "$HPCBRIDGE_ARRAY_INDEX" != 2 ] || { echo "task 2 broke" >&2; exit 4; }'
    job = submit_script(store, sched, job_script(tmp_path, "arr", body), array="1,2,3")
    done = wait(store, sched, job)[job.native_id]
    assert (done.state, done.exit_code) == ("failed", 4)
    assert "task 2 broke" in done.log_tail
    codes = [read_json(state_dir(job) / f"status.{i}.json")["exit_code"] for i in (1, 2, 3)]
    assert codes == [0, 4, 0]  # the other tasks still ran
    assert settled(sched, job.native_id).state is State.FAILED


def test_a_bad_array_range_submits_nothing(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    with pytest.raises(SchedulerError, match="invalid array range 'x-y'"):
        submit_script(store, sched, job_script(tmp_path, "arr", "true"), array="x-y")
    assert store.all() == [] and _all_ids(sched.root) == []


# --- walltime ---------------------------------------------------------------------------------


def test_a_job_over_its_walltime_is_killed_and_failed(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    body = 'sleep 30 &\necho $! > "$HPCBRIDGE_WORK/child.pid"\nwait'
    script = job_script(tmp_path, "slow", body, walltime="00:00:01")
    assert parse_script(script.read_text()).walltime == "00:00:01"
    job = submit_script(store, sched, script)
    done = wait(store, sched, job)[job.native_id]
    assert done.state == "failed"
    assert done.exit_code not in (None, 0)
    assert "walltime" in done.reason
    # The script's own record does not claim success either.
    assert read_json(state_dir(job) / "status.json")["exit_code"] != 0
    status = settled(sched, job.native_id)
    assert status.state is State.FAILED
    assert status.reason == "walltime 1 s exceeded"
    child = int((tmp_path / "work" / "slow" / "child.pid").read_text())
    eventually(lambda: gone(child), "the job's sleep to be killed")


# --- cancel -----------------------------------------------------------------------------------


def test_cancelling_a_running_job_kills_its_processes(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    body = 'sleep 60 &\necho $! > "$HPCBRIDGE_WORK/child.pid"\nwait'
    job = submit_script(store, sched, job_script(tmp_path, "victim", body))
    pid_file = tmp_path / "work" / "victim" / "child.pid"
    eventually(pid_file.exists, "the job to start its sleep")
    child = int(pid_file.read_text())
    assert not gone(child)
    [cancelled] = cancel_jobs(store, sched, [job.native_id])
    assert (cancelled.state, cancelled.reason) == ("cancelled", "cancelled")
    eventually(lambda: gone(child), "the job's sleep to be killed")
    assert settled(sched, job.native_id).state is State.CANCELLED
    # Later polls keep it cancelled, whatever its script recorded on the way out.
    assert refresh(store, sched).jobs[0].state == "cancelled"
    assert store.get(job.native_id).state == "cancelled"  # type: ignore[union-attr]


def test_cancelling_a_queued_job(
    tmp_path: Path, make_sched: Callable[..., LocalScheduler], store: JobStore
) -> None:
    sched = make_sched(max_jobs=1)
    first = submit_script(store, sched, job_script(tmp_path, "first", WAIT_FOR_GATE))
    queued = submit_script(store, sched, job_script(tmp_path, "queued", "echo ran > ran.txt"))
    eventually(lambda: (state_dir(first) / "started.json").exists(), "the first job to start")
    assert local_status(sched, queued.native_id).state is State.QUEUED
    [cancelled] = cancel_jobs(store, sched, [queued.native_id])
    assert cancelled.state == "cancelled"
    assert settled(sched, queued.native_id).state is State.CANCELLED
    open_gate(first)
    done = wait(store, sched, first, queued)
    assert (done[first.native_id].state, done[queued.native_id].state) == ("finished", "cancelled")
    assert not (tmp_path / "work" / "queued" / "ran.txt").exists()
    assert not (state_dir(queued) / "started.json").exists()


def test_cancelling_an_unknown_id(tmp_path: Path, sched: LocalScheduler, store: JobStore) -> None:
    assert sched.cancel(["999"]) == ["999"]
    with pytest.raises(SchedulerError, match="unknown job id") as err:
        cancel_jobs(store, sched, ["999"])
    assert "999" in err.value.message
    with pytest.raises(SchedulerError, match="not local job ids"):
        cancel_jobs(store, sched, ["4242.pbsserver"])


def test_cancelling_a_finished_job_changes_nothing(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    job = submit_script(store, sched, job_script(tmp_path, "ok", "true"))
    wait(store, sched, job)
    [same] = cancel_jobs(store, sched, [job.native_id])
    assert (same.state, same.exit_code) == ("finished", 0)
    assert settled(sched, job.native_id).state is State.FINISHED


# --- a runner that died -----------------------------------------------------------------------


def test_a_job_whose_runner_died_is_failed_not_queued_forever(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    a = submit_script(store, sched, job_script(tmp_path, "a", WAIT_FOR_GATE))
    b = submit_script(store, sched, job_script(tmp_path, "b", "echo b"), after=[a.native_id])
    c = submit_script(store, sched, job_script(tmp_path, "c", "echo c"), after=[b.native_id])
    assert local_status(sched, b.native_id).state is State.QUEUED
    pid = runner_pid(sched, b.native_id)
    os.kill(pid, signal.SIGKILL)  # our own child: sched.submit started it
    eventually(lambda: gone(pid), "the runner to die")
    status = local_status(sched, b.native_id)
    assert (status.state, status.raw_state) == (State.FAILED, "lost")
    assert "runner died" in status.reason
    # C's runner sees it too and gives up instead of waiting forever.
    c_status = settled(sched, c.native_id)
    assert c_status.state is State.CANCELLED
    assert b.native_id in c_status.reason and "runner died" in c_status.reason
    report = refresh(store, sched)
    by_id = {j.native_id: j for j in report.jobs}
    assert by_id[b.native_id].state == "failed"
    assert "runner died" in by_id[b.native_id].reason
    assert by_id[c.native_id].state == "cancelled"
    assert by_id[a.native_id].state == "running"
    open_gate(a)
    done = wait(store, sched, a, b, c)
    assert [done[j.native_id].state for j in (a, b, c)] == ["finished", "failed", "cancelled"]
    assert not (state_dir(b) / "started.json").exists()


def test_a_running_job_outlives_its_runner_and_its_status_file_decides(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    job = submit_script(store, sched, job_script(tmp_path, "orphan", WAIT_FOR_GATE))
    eventually(lambda: (state_dir(job) / "started.json").exists(), "the job to start")
    pid = runner_pid(sched, job.native_id)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: gone(pid), "the runner to die")
    assert local_status(sched, job.native_id).raw_state == "lost"
    open_gate(job)  # the job itself is alive and now ends well
    done = wait(store, sched, job)[job.native_id]
    assert (done.state, done.exit_code) == ("finished", 0)


# --- reusing a work folder --------------------------------------------------------------------


def test_a_reused_work_folder_starts_clean(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    work = tmp_path / "work" / "shared"
    one = submit_script(
        store, sched, job_script(tmp_path, "one", "echo run-one; echo err-one >&2", work=work)
    )
    assert wait(store, sched, one)[one.native_id].state == "finished"
    assert (work / ".hpcbridge" / "status.json").exists()
    body = f"{WAIT_FOR_GATE}\necho run-two\necho err-two >&2\nexit 2"
    two = submit_script(store, sched, job_script(tmp_path, "two", body, work=work))
    # The last run's outcome is gone: the new job is not taken for finished.
    assert not (work / ".hpcbridge" / "status.json").exists()
    for _ in range(3):
        polled = {j.native_id: j for j in refresh(store, sched).jobs}[two.native_id]
        assert polled.state in ("queued", "running")
        time.sleep(0.1)
    (work / "gate").touch()
    done = wait(store, sched, two)[two.native_id]
    assert (done.state, done.exit_code) == ("failed", 2)
    # Its log is its own: the first run's lines are not passed off as this run's.
    assert "err-two" in done.log_tail and "err-one" not in done.log_tail
    assert (work / ".hpcbridge" / "job.out").read_text() == "run-two\n"
    assert store.get(one.native_id).state == "finished"  # type: ignore[union-attr]


def test_a_work_folder_in_use_is_refused(
    tmp_path: Path, sched: LocalScheduler, store: JobStore
) -> None:
    work = tmp_path / "work" / "busy"
    first = submit_script(store, sched, job_script(tmp_path, "first", WAIT_FOR_GATE, work=work))
    eventually(lambda: (work / ".hpcbridge" / "started.json").exists(), "the job to start")
    second = job_script(tmp_path, "second", "echo two", work=work)
    with pytest.raises(SchedulerError, match=f"belongs to job {first.native_id}") as err:
        submit_script(store, sched, second)
    assert str(work) in err.value.message
    hint = hints.hint(err.value)
    assert hint and "cancel" in hint
    # The running job was not disturbed: its started file is still there.
    assert (work / ".hpcbridge" / "started.json").exists()
    assert [j.native_id for j in store.all()] == [first.native_id]
    (work / "gate").touch()
    assert settled(sched, first.native_id).state is State.FINISHED
    # Ended, though nobody polled it yet: the folder is free again.
    again = submit_script(store, sched, second)
    assert store.get(first.native_id).state == "finished"  # type: ignore[union-attr]
    assert wait(store, sched, again)[again.native_id].state == "finished"
