"""One process at a time moves a run, and a pass without a run id moves every active run
(issue 15): real `hpcbridge sync` processes against a sandbox XNAT and the local scheduler.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_runs
from test_runs import (  # noqa: F401  (fixtures are found by name)
    FAST,
    PROVENANCE_FILE,
    RUN_T1,
    T1_SCANS,
    WAIT_LIMIT,
    Bridge,
    Xnat,
    cli,
    delta,
    eventually,
    hb,
    local_jobs,
    local_state,
    nothing_left_running,
    states,
    status_json,
    write_recipe,
)

from hpcbridge import runlock
from hpcbridge.config import load_settings
from hpcbridge.errors import StageError
from hpcbridge.ledger import Ledger
from hpcbridge.runlock import lock_path
from hpcbridge.runs import sync as passes

# test_runs's fixtures, by the names the tests ask for
xnat = test_runs.xnat
bridge = test_runs.bridge

HOST = socket.gethostname()
# `run 3 is busy: sync by alice on login2 (pid 4242) since 10:02`
BUSY = r"run {run} is busy: {command} by \S+ on {host} \(pid {pid}\) since \d\d:\d\d"
BOLD_SCANS = [f"PTV000/{s}/{s}_MR1/5" for s in ("Haofei01", "Haofei02", "Haofei03")]


def listing_recipe(tmp_path: Path) -> list[str]:
    """A quick recipe (no dcm2niix): ``listing.txt`` into the scan's LISTING resource."""
    folder = write_recipe(
        tmp_path / "recipes",
        "listing",
        "ls {{ input_dir }} > {{ output_dir }}/listing.txt",
        resource="LISTING",
    )
    return ["--recipes", str(folder)]


def jobs_ended(home: Path, count: int) -> bool:
    jobs = local_jobs(home)
    ended = [local_state(home, j["id"]).get("state") in ("finished", "failed") for j in jobs]
    return len(jobs) == count and all(ended)


def plant(run_id: int, *, host: str, pid: int, age: float = 0.0, command: str = "sync") -> Path:
    """A run lock as another process would have left it, last touched ``age`` seconds ago."""
    path = lock_path(load_settings(), run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))
    data = {"host": host, "pid": pid, "user": "alice", "command": command, "since": since}
    path.write_text(json.dumps({**data, "token": "feedbeef"}) + "\n")
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def uploaded_events(run_id: int) -> list[int]:
    with Ledger.for_settings(load_settings()) as ledger:
        return [
            [str(e.to_state) for e in ledger.events(job.job_id)].count("uploaded")
            for job in ledger.jobs(run_id)
        ]


# --- two passes at once ------------------------------------------------------------------------


def test_two_syncs_at_once_upload_each_scan_once_and_the_second_says_who_is_at_work(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipe = listing_recipe(tmp_path)
    started = cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe)
    assert started.exit_code == 0, started.output
    eventually(lambda: jobs_ended(isolated_home, 3), "the three jobs to end")

    # Slow answers keep the first pass at work while the second one starts.
    xnat.server.faults.latency = 0.1
    before = xnat.stats()
    cmd = [sys.executable, "-m", "hpcbridge", "sync"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=WAIT_LIMIT) for p in procs]
    xnat.server.faults.latency = 0.0
    after = xnat.stats()

    assert [p.returncode for p in procs] == [0, 0], outs
    skipped = [i for i, (_, err) in enumerate(outs) if "busy" in err]
    assert len(skipped) == 1, outs
    loser, winner = skipped[0], 1 - skipped[0]
    line = BUSY.format(run=1, command="sync", host=re.escape(HOST), pid=procs[winner].pid)
    assert re.fullmatch(line + "; skipped\n", outs[loser][1]), outs[loser][1]
    assert outs[loser][0] == ""
    assert "busy" not in outs[winner][1]

    # Every scan uploaded exactly once.
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert len(xnat.stored) == 3 * 2, xnat.stored  # listing.txt and the provenance, per scan
    assert set(xnat.stored.values()) == {1}, xnat.stored
    assert uploaded_events(1) == [1, 1, 1]
    puts = delta(before, after).get("PUT", 0)
    assert 0 < puts <= 15, puts  # one pass's worth (the issue saw 27 from two passes)
    assert not lock_path(load_settings(), 1).exists()


# --- stale locks -------------------------------------------------------------------------------


def test_the_lock_a_killed_run_left_is_taken_over_by_the_next_sync(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, bridge: Callable[..., Bridge]
) -> None:
    recipe = listing_recipe(tmp_path)
    running = bridge("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe, "--wait", *FAST)
    running.wait_for(r"submitted as job")
    lock = lock_path(load_settings(), 1)
    assert json.loads(lock.read_text())["command"] == "run --wait"
    pid = running.proc.pid
    running.kill()  # kill -9: no finally, the lock stays behind
    assert lock.exists()

    resumed = hb("sync", "--watch", *FAST)
    assert resumed.returncode == 0, resumed.stderr
    took = [line for line in resumed.stderr.splitlines() if "stale lock" in line]
    assert len(took) == 1, resumed.stderr
    assert re.fullmatch(
        r"hpcbridge: warning: run 1: took over its stale lock \("
        + BUSY.format(run=1, command="run --wait", host=re.escape(HOST), pid=pid)[
            len("run 1 is busy: ") :
        ]
        + r" is no longer running\)",
        took[0],
    ), took[0]
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert not lock.exists()


def test_a_lock_of_another_host_is_respected_until_it_is_older_than_the_limit(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipe = listing_recipe(tmp_path)
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    eventually(lambda: jobs_ended(isolated_home, 3), "the three jobs to end")

    # A dead pid says nothing about a process on another host: nine minutes is not stale.
    path = plant(1, host="login2.example.org", pid=999999, age=540)
    before = xnat.stats()
    busy = cli("sync", "1")
    assert busy.exit_code == 0, busy.output
    assert re.fullmatch(
        BUSY.format(run=1, command="sync", host="login2.example.org", pid=999999).replace(
            r"\S+", "alice"
        )
        + "; skipped\n",
        busy.stderr,
    ), busy.stderr
    as_json = cli("--json", "sync", "1")
    assert as_json.exit_code == 0, as_json.output
    holder = json.loads(as_json.stdout)["busy"]
    assert json.loads(as_json.stdout) == {"run": 1, "busy": holder}
    assert holder == {
        "command": "sync",
        "user": "alice",
        "host": "login2.example.org",
        "pid": 999999,
        "since": holder["since"],
    }
    assert delta(before, xnat.stats()).get("PUT", 0) == 0
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "submitted")

    os.utime(path, (time.time() - 660, time.time() - 660))  # no heartbeat for 11 minutes
    moved = cli("sync", "1")
    assert moved.exit_code == 0, moved.output
    assert "run 1: took over its stale lock (sync by alice on login2.example.org" in moved.stderr
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert not path.exists()


def test_retry_and_cancel_wait_a_little_then_name_who_holds_the_run(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = listing_recipe(tmp_path)
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    monkeypatch.setattr(runlock, "BUSY_WAIT", 0.5)
    # This test's own process holds it: alive, on this host.
    path = plant(1, host=HOST, pid=os.getpid(), command="run --wait")
    line = BUSY.format(run=1, command="run --wait", host=re.escape(HOST), pid=os.getpid())
    line = line.replace(r"\S+", "alice")
    for args in (["retry", "1"], ["cancel", "--run", "1"]):
        start = time.monotonic()
        result = cli(*args)
        assert time.monotonic() - start >= 0.5
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        waiting, error = result.stderr.splitlines()
        assert re.fullmatch(line + "; waiting up to 0.5 s", waiting), waiting
        assert re.fullmatch(
            "hpcbridge: error: " + line + r"; gave up after 0.5 s \(try again once it has "
            rf"ended; if that process is gone, delete {re.escape(str(path))}\)",
            error,
        ), error
    # Neither touched the run.
    assert status_json(1)["run"]["state"] == "active"
    assert set(states(status_json(1)).values()) <= {"submitted", "running"}
    path.unlink()
    assert cli("cancel", "--run", "1").exit_code == 0
    assert not path.exists()


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (StageError("the disk is full"), 1, "hpcbridge: error: the disk is full"),
        (KeyboardInterrupt(), 130, "hpcbridge: error: interrupted"),
    ],
    ids=["error", "ctrl-c"],
)
def test_the_lock_is_released_when_a_pass_fails(
    xnat: Xnat,
    isolated_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    raised: BaseException,
    code: int,
    line: str,
) -> None:
    recipe = listing_recipe(tmp_path)
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    held = []

    def failing(*args: object, **kwargs: object) -> None:
        held.append(lock_path(load_settings(), 1).exists())
        raise raised

    monkeypatch.setattr(passes, "one_pass", failing)
    for args in (["sync", "1"], ["sync"], ["retry", "1"]):
        if args[0] == "retry":
            with Ledger.for_settings(load_settings()) as ledger:
                ledger.transition(ledger.jobs(1)[0].job_id, "failed", last_error="test")
        failed = cli(*args)
        assert failed.exit_code == (1 if args == ["sync"] and code == 1 else code), failed.output
        assert "Traceback" not in failed.stderr
        assert failed.stderr.splitlines()[-1].startswith(
            line.replace("error: ", "error: run 1: ") if args == ["sync"] and code == 1 else line
        ), failed.stderr
        assert not lock_path(load_settings(), 1).exists()
    assert held == [True, True, True]


# --- sync without a run id ---------------------------------------------------------------------


def test_sync_without_a_run_id_moves_every_active_run_and_skips_a_busy_one(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipe = listing_recipe(tmp_path)
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    assert cli("run", "listing", "PTV000", "--scan-type", "*bold*", *recipe).exit_code == 0
    eventually(lambda: jobs_ended(isolated_home, 6), "the six jobs to end")

    path = plant(1, host=HOST, pid=os.getpid())
    first = hb("sync")
    assert first.returncode == 0, first.stderr
    assert re.search(
        "^"
        + BUSY.format(run=1, command="sync", host=re.escape(HOST), pid=os.getpid())
        + "; skipped$",
        first.stderr,
        re.M,
    ), first.stderr
    assert states(status_json(2)) == dict.fromkeys(BOLD_SCANS, "uploaded")
    assert status_json(1)["run"]["state"] == "active"

    path.unlink()
    second = hb("--json", "sync")
    assert second.returncode == 0, second.stderr
    assert "busy" not in second.stderr
    assert json.loads(second.stdout) == [
        {"run": 1, "counts": status_json(1)["counts"], "state": "done"}
    ]  # run 2 has ended: only active runs are moved
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")

    nothing = hb("sync")
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stderr == "no active runs: nothing to sync\n"


def test_sync_without_a_run_id_exits_3_when_one_run_ends_with_failures(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    recipe = listing_recipe(tmp_path)
    failing = write_recipe(tmp_path / "failing", "failing", "exit 4")
    assert cli("run", "failing", T1_SCANS[0], "--recipes", str(failing)).exit_code == 0
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    eventually(lambda: jobs_ended(isolated_home, 4), "the four jobs to end")

    done = hb("sync")
    assert done.returncode == 3, done.stderr
    assert "hpcbridge: error: run 1 ended with 1 of 1 scan(s) failed or cancelled" in done.stderr
    assert states(status_json(2)) == dict.fromkeys(T1_SCANS, "uploaded")
    # The failed run has ended: later passes leave it alone.
    assert hb("sync").returncode == 0


# --- runs --------------------------------------------------------------------------------------


STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_runs_lists_the_runs_newest_first(xnat: Xnat, isolated_home: Path, tmp_path: Path) -> None:
    empty = cli("runs")
    assert empty.exit_code == 0 and empty.stdout == "" and empty.stderr == "no runs yet\n"
    assert cli("--json", "runs").stdout == "[]\n"

    recipe = listing_recipe(tmp_path)
    assert cli("run", "listing", "PTV000", "--scan-type", "*T1*", *recipe).exit_code == 0
    assert (
        cli("run", "listing", T1_SCANS[0].rsplit("/", 1)[0], "--scan", "5", *recipe).exit_code == 0
    )
    eventually(lambda: jobs_ended(isolated_home, 4), "the four jobs to end")
    assert cli("sync", "2").exit_code == 0

    table = cli("runs")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "RUN", "RECIPE", "TARGET", "PROFILE", "STATE", "JOBS", "CREATED", "LAST", "ACTIVITY"
    ]  # fmt: skip
    assert re.fullmatch(
        rf"2 +listing +PTV000/Haofei01/Haofei01_MR1 +default +done +uploaded 1 +{STAMP} +{STAMP}",
        lines[1],
    ), lines[1]
    assert re.fullmatch(
        rf"1 +listing +PTV000 +default +active +submitted 3 +{STAMP} +{STAMP}", lines[2]
    ), lines[2]
    assert len(lines) == 3

    data = json.loads(cli("--json", "runs").stdout)
    assert [r["id"] for r in data] == [2, 1]
    two = data[0]
    assert two["recipe"] == "listing" and two["target"] == "PTV000/Haofei01/Haofei01_MR1"
    assert two["state"] == "done" and two["profile"] == "default" and two["jobs"] == 1
    assert two["counts"]["uploaded"] == 1 and sum(two["counts"].values()) == 1
    for run in data:
        assert re.fullmatch(STAMP, run["created"]) and re.fullmatch(STAMP, run["last_activity"])
        assert run["last_activity"] >= run["created"]

    limited = cli("runs", "--limit", "1")
    assert [line.split()[0] for line in limited.stdout.splitlines()[1:]] == ["2"]
    assert limited.stderr == "the 1 newest shown; --all for every run\n"
    active = json.loads(cli("--json", "runs", "--active").stdout)
    assert [r["id"] for r in active] == [1]
    assert [r["id"] for r in json.loads(cli("--json", "runs", "--all").stdout)] == [2, 1]


def test_run_wait_waits_for_a_busy_run_and_then_follows_it_to_the_end(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, bridge: Callable[..., Bridge]
) -> None:
    recipe = listing_recipe(tmp_path)
    args = ["run", "listing", "PTV000", "--scan-type", "*T1*", *recipe]
    assert cli(*args).exit_code == 0
    path = plant(1, host=HOST, pid=os.getpid())  # a cron pass at work, say
    waiting = bridge(*args, "--wait", *FAST)
    line = waiting.wait_for(r"is busy")
    busy = BUSY.format(run=1, command="sync", host=re.escape(HOST), pid=os.getpid())
    assert re.fullmatch(busy.replace(r"\S+", "alice") + "; waiting\n", line), line
    time.sleep(1)
    assert status_json(1)["run"]["state"] == "active"  # nothing moved while it waited
    path.unlink()
    assert waiting.proc.wait(timeout=WAIT_LIMIT) == 0
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "uploaded")
    assert not path.exists()
