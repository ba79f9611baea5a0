"""The run ledger: schema and migrations, states, JSON fields, concurrency, crashes, NFS mode."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpcbridge import ledger as ledger_mod
from hpcbridge.cli import hints
from hpcbridge.config import load_settings
from hpcbridge.errors import HpcBridgeError, LedgerError
from hpcbridge.ledger import (
    FINAL_STATES,
    MIGRATIONS,
    TRANSITIONS,
    JobState,
    Ledger,
    RunState,
)

# Children must not inherit a parent's SQLite connection in use, and forking is what keeps these
# tests fast (spawn re-imports everything); the parent closes its ledgers before forking.
mp = multiprocessing.get_context("fork")

MODES = ["wal", "nfs"]
PIPELINE = [JobState.STAGED, JobState.SUBMITTED, JobState.RUNNING, JobState.FINISHED]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


@pytest.fixture()
def ledger(path: Path, mode: str) -> Any:
    with Ledger(path, mode=mode) as opened:
        yield opened


def new_run(ledger: Ledger, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "recipe": "dcm2niix",
        "params": {"compress": "y"},
        "target": "https://xnat.example.org/data/projects/PTV000",
        "profile": "artemis",
        "options": {"scan_types": ["T1*"], "max_queued": 10},
    }
    return ledger.create_run(**{**values, **overrides})


def new_job(ledger: Ledger, run_id: int, scan: str = "4", **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "address": f"PTV000/Haofei01/Haofei01_MR1/{scan}",
        "project": "PTV000",
        "subject": "Haofei01",
        "experiment": "Haofei01_MR1",
        "experiment_id": "XNAT_E00001",
        "scan": scan,
        "scan_type": "T1",
        "name": f"hpcb-{run_id}-{scan}",
        "work_dir": f"/scratch/run{run_id}/{scan}",
    }
    return ledger.add_job(run_id, **{**values, **overrides})


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


# -- opening, schema, migrations -------------------------------------------------------------


def test_a_new_ledger_gets_the_schema_and_private_permissions(path: Path, mode: str) -> None:
    with Ledger(path, mode=mode):
        pass
    assert user_version(path) == len(MIGRATIONS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert {"runs", "jobs", "events"} <= tables
    assert {"jobs_run_state", "jobs_native_id"} <= indexes
    assert journal == ("wal" if mode == "wal" else "delete")


def test_an_existing_empty_database_at_version_0_is_migrated(path: Path) -> None:
    # A database with no tables yet, but a database: a 0-byte file is a lost ledger, refused.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 0")  # writes the header
    conn.close()
    assert path.stat().st_size > 0
    assert user_version(path) == 0
    with Ledger(path) as ledger:
        assert ledger.runs() == []
    assert user_version(path) == len(MIGRATIONS)


def test_a_ledger_from_a_newer_hpcbridge_is_refused(path: Path, mode: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    with pytest.raises(LedgerError, match="newer hpcbridge.*upgrade") as err:
        Ledger(path, mode=mode)
    assert str(path) in str(err.value)
    assert user_version(path) == 999  # untouched
    assert not Path(f"{path}.lock").exists()


def test_a_file_that_is_not_a_database_is_refused_clearly(path: Path) -> None:
    path.write_text("these are not the tables you are looking for\n" * 100)
    with pytest.raises(LedgerError, match="cannot be used") as err:
        Ledger(path)
    assert "move it aside" in (err.value.hint or "")


def test_migrations_apply_in_order_each_in_its_own_transaction(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Ledger(path).close()
    later = [
        *MIGRATIONS,
        "ALTER TABLE runs ADD COLUMN note TEXT; CREATE TABLE notes (text TEXT DEFAULT 'a;b');",
        "CREATE TABLE half (x);\nINSERT INTO nowhere VALUES (1);",
    ]
    monkeypatch.setattr(ledger_mod.schema, "MIGRATIONS", later)
    with pytest.raises(LedgerError, match="no such table: nowhere"):
        Ledger(path)
    # The good one stuck, the broken one left nothing behind (not even its first statement).
    assert user_version(path) == len(MIGRATIONS) + 1
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
    assert "notes" in tables and "note" in columns
    assert "half" not in tables


def test_migration_scripts_split_at_statements_not_at_every_semicolon() -> None:
    script = """
        CREATE TABLE t (x TEXT DEFAULT 'a;b');  -- a comment; with a semicolon
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET x = 'c;d'; END;
    """
    statements = list(ledger_mod.schema.statements(script))
    assert len(statements) == 2
    assert statements[1].endswith("END;")
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)


def test_for_settings_puts_the_ledger_in_home_with_a_private_folder(isolated_home: Path) -> None:
    settings = load_settings()
    assert not isolated_home.exists()
    with Ledger.for_settings(settings) as ledger:
        assert ledger.path == isolated_home / "ledger.sqlite"
        assert ledger.mode == "wal"
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700


def test_for_settings_honours_ledger_path_and_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    settings = dataclasses.replace(load_settings(), ledger="~/shared/lab.sqlite", ledger_mode="nfs")
    with Ledger.for_settings(settings, lock_timeout=1) as ledger:
        assert ledger.path == tmp_path / "user" / "shared" / "lab.sqlite"
        assert ledger.mode == "nfs"
        assert ledger.lock_timeout == 1
        new_run(ledger)
    assert not Path(f"{ledger.path}-wal").exists()


def test_an_unknown_mode_and_a_closed_ledger_are_errors(path: Path) -> None:
    with pytest.raises(LedgerError, match="unknown ledger mode"):
        Ledger(path, mode="fast")
    ledger = Ledger(path)
    ledger.close()
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.runs()


def test_ledger_error_is_an_hpcbridge_error() -> None:
    assert issubclass(LedgerError, HpcBridgeError)


# -- runs --------------------------------------------------------------------------------------


def test_runs_round_trip_their_json(ledger: Ledger) -> None:
    params = {"compress": "y", "filename": "%p_%s", "nested": {"b": [1, 2.5, None], "a": "é"}}
    run = new_run(ledger, params=params, options={"chain": True, "queues": {"transfer": "dtq"}})
    assert run.id >= 1
    assert run.state is RunState.ACTIVE
    assert run.created.endswith("Z") and len(run.created) == 20
    again = ledger.run(run.id)
    assert again == run
    assert again.params == params
    assert again.options == {"chain": True, "queues": {"transfer": "dtq"}}


def test_an_unknown_run_says_where_to_look(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no run 42") as err:
        ledger.run(42)
    assert err.value.run_id == 42
    assert "`hpcbridge runs` lists the runs" in (hints.hint(err.value) or "")
    with pytest.raises(LedgerError, match="no run 42"):
        ledger.set_run_state(42, "done")
    with pytest.raises(LedgerError, match="no run 42"):
        new_job(ledger, 42)


def test_latest_run_and_runs_by_profile(ledger: Ledger) -> None:
    assert ledger.latest_run() is None
    first = new_run(ledger, profile="artemis")
    second = new_run(ledger, profile="sandbox")
    third = new_run(ledger, profile="artemis")
    assert ledger.latest_run() == third
    assert ledger.latest_run("sandbox") == second
    assert ledger.latest_run("nowhere") is None
    assert [r.id for r in ledger.runs()] == [first.id, second.id, third.id]
    assert [r.id for r in ledger.runs("artemis")] == [first.id, third.id]


def test_run_state_changes(ledger: Ledger) -> None:
    run = new_run(ledger)
    assert ledger.set_run_state(run.id, RunState.DONE).state is RunState.DONE
    assert ledger.set_run_state(run.id, "cancelled").state == "cancelled"
    with pytest.raises(LedgerError, match="unknown run state"):
        ledger.set_run_state(run.id, "finished")


# -- jobs and states -----------------------------------------------------------------------------


def test_add_job_is_idempotent_per_run_and_address(ledger: Ledger) -> None:
    run = new_run(ledger)
    job = new_job(ledger, run.id)
    assert job.state is JobState.PLANNED and job.attempts == 0
    assert job.uploaded == [] and job.extra == {}
    ledger.transition(job.job_id, "staged")
    again = new_job(ledger, run.id, name="another-name", work_dir="/elsewhere")
    assert again.job_id == job.job_id
    assert again.state is JobState.STAGED and again.name == job.name
    assert len(ledger.jobs(run.id)) == 1
    assert len(ledger.events(job.job_id)) == 2  # created, staged: no second creation


def test_job_names_are_unique_in_the_whole_ledger(ledger: Ledger) -> None:
    one, two = new_run(ledger), new_run(ledger)
    job = new_job(ledger, one.id, name="hpcb-x")
    with pytest.raises(LedgerError, match=f"already used by job {job.job_id}"):
        new_job(ledger, two.id, name="hpcb-x")
    with pytest.raises(LedgerError, match="no job 999"):
        ledger.job(999)


def test_the_whole_way_records_every_step_with_times(ledger: Ledger) -> None:
    run = new_run(ledger)
    job = new_job(ledger, run.id)
    job = ledger.transition(job.job_id, "staged", detail="42 files, 21 MB")
    job = ledger.transition(job.job_id, JobState.SUBMITTED, native_id="1234.pbs", script_hash="ab")
    assert job.submitted_at and job.native_id == "1234.pbs" and job.script_hash == "ab"
    job = ledger.transition(job.job_id, JobState.RUNNING, raw_state="R")
    assert job.started_at and job.raw_state == "R" and job.ended_at is None
    job = ledger.transition(job.job_id, JobState.FINISHED, exit_code=0, raw_state="F")
    assert job.ended_at and job.exit_code == 0
    files = [{"name": "T1.nii.gz", "size": 123, "md5": "0" * 32}, {"name": "T1.json"}]
    job = ledger.transition(job.job_id, JobState.UPLOADED, uploaded=files)
    assert job.uploaded_at and job.uploaded == files and job.final
    assert all(t.endswith("Z") for t in (job.submitted_at, job.started_at, job.updated_at))
    events = ledger.events(job.job_id)
    assert [(e.from_state, e.to_state) for e in events] == [
        (None, JobState.PLANNED),
        (JobState.PLANNED, JobState.STAGED),
        (JobState.STAGED, JobState.SUBMITTED),
        (JobState.SUBMITTED, JobState.RUNNING),
        (JobState.RUNNING, JobState.FINISHED),
        (JobState.FINISHED, JobState.UPLOADED),
    ]
    assert events[1].detail == "42 files, 21 MB"
    counts = ledger.counts(run.id)
    assert list(counts) == [s.value for s in JobState]
    assert counts == {**dict.fromkeys(counts, 0), "uploaded": 1}


@pytest.mark.parametrize(
    ("steps", "illegal"),
    [
        ([], JobState.RUNNING),
        ([], JobState.UPLOADED),
        ([JobState.STAGED], JobState.FINISHED),
        ([*PIPELINE], JobState.CANCELLED),
        ([*PIPELINE, JobState.UPLOADED], JobState.FAILED),
        ([*PIPELINE, JobState.UPLOADED], JobState.PLANNED),
        ([JobState.FAILED], JobState.SUBMITTED),
        ([JobState.SUBMITTED], JobState.STAGED),
    ],
)
def test_illegal_transitions_are_refused_and_change_nothing(
    ledger: Ledger, steps: list[JobState], illegal: JobState
) -> None:
    run = new_run(ledger)
    job = new_job(ledger, run.id)
    for step in steps:
        job = ledger.transition(job.job_id, step)
    events = ledger.events(job.job_id)
    with pytest.raises(LedgerError) as err:
        ledger.transition(job.job_id, illegal, native_id="should-not-stick")
    message = str(err.value)
    assert f"job {job.job_id}" in message and job.name in message
    assert f"from {job.state.value} to {illegal.value}" in message
    assert ledger.job(job.job_id) == job
    assert ledger.events(job.job_id) == events


def test_the_transition_table_is_what_the_states_promise() -> None:
    assert FINAL_STATES == {JobState.UPLOADED, JobState.FAILED, JobState.CANCELLED}
    assert TRANSITIONS[JobState.PLANNED] >= {JobState.SUBMITTED}  # chains submit first
    assert TRANSITIONS[JobState.UPLOADED] == set()
    for state in JobState:
        if state not in FINAL_STATES and state is not JobState.FINISHED:
            assert {JobState.FAILED, JobState.CANCELLED} <= TRANSITIONS[state]
    assert str(JobState.RUNNING) == "running" and f"{JobState.FAILED}" == "failed"
    assert JobState.FAILED.final and not JobState.FINISHED.final


def test_a_chain_job_is_submitted_before_staging(ledger: Ledger) -> None:
    job = new_job(ledger, new_run(ledger).id)
    job = ledger.transition(job.job_id, "submitted", extra={"chain": ["1.pbs", "2.pbs", "3.pbs"]})
    assert job.state is JobState.SUBMITTED
    assert job.extra == {"chain": ["1.pbs", "2.pbs", "3.pbs"]}


def test_the_same_state_again_records_no_event_but_keeps_the_fields(ledger: Ledger) -> None:
    job = new_job(ledger, new_run(ledger).id)
    job = ledger.transition(job.job_id, "submitted", native_id="7")
    assert ledger.transition(job.job_id, "submitted") == job
    again = ledger.transition(job.job_id, "submitted", raw_state="Q")
    assert again.raw_state == "Q" and again.submitted_at == job.submitted_at
    assert len(ledger.events(job.job_id)) == 2


def test_a_retry_counts_the_attempt_and_forgets_the_last_outcome(ledger: Ledger) -> None:
    job = new_job(ledger, new_run(ledger).id)
    for step in (JobState.STAGED, JobState.SUBMITTED, JobState.RUNNING):
        ledger.transition(job.job_id, step, native_id="99.pbs", raw_state="R")
    failed = ledger.transition(
        job.job_id, "failed", exit_code=137, last_error="killed: walltime", log_tail="...\nKilled\n"
    )
    assert failed.exit_code == 137 and failed.ended_at and failed.final
    retried = ledger.transition(job.job_id, "planned", detail="retry --failed")
    assert retried.attempts == 1
    assert retried.state is JobState.PLANNED
    for name in ("native_id", "exit_code", "last_error", "log_tail", "raw_state", "ended_at"):
        assert getattr(retried, name) is None, name
    assert retried.work_dir == job.work_dir and retried.name == job.name
    ledger.transition(job.job_id, "cancelled")
    assert ledger.transition(job.job_id, "planned").attempts == 2
    assert ledger.events(job.job_id)[-3].detail == "retry --failed"


def test_fields_are_checked_and_update_records_no_event(ledger: Ledger) -> None:
    job = new_job(ledger, new_run(ledger).id)
    with pytest.raises(TypeError, match="unknown job field.*nativeid"):
        ledger.transition(job.job_id, "staged", nativeid="1")
    with pytest.raises(TypeError, match="unknown job field.*state"):
        ledger.update(job.job_id, state="uploaded")
    with pytest.raises(TypeError, match="uploaded must be a list"):
        ledger.update(job.job_id, uploaded="T1.nii")
    with pytest.raises(LedgerError, match="cannot be recorded"):
        ledger.update(job.job_id, extra={"when": object()})
    with pytest.raises(LedgerError, match="unknown job state 'done'"):
        ledger.transition(job.job_id, "done")
    updated = ledger.update(
        job.job_id, work_dir=Path("/scratch/x"), extra={"stage_in": "1.pbs"}, script_hash="cafe"
    )
    assert updated.work_dir == "/scratch/x" and updated.extra == {"stage_in": "1.pbs"}
    assert updated.state is JobState.PLANNED
    assert ledger.job(job.job_id) == updated
    assert len(ledger.events(job.job_id)) == 1


def test_jobs_by_state_in_id_order(ledger: Ledger) -> None:
    run, other = new_run(ledger), new_run(ledger)
    jobs = [new_job(ledger, run.id, scan=str(n)) for n in range(1, 6)]
    new_job(ledger, other.id, scan="1")
    ledger.transition(jobs[1].job_id, "failed")
    ledger.transition(jobs[3].job_id, "cancelled")
    assert [j.job_id for j in ledger.jobs(run.id)] == [j.job_id for j in jobs]
    assert [j.job_id for j in ledger.jobs(run.id, ["failed", JobState.CANCELLED])] == [
        jobs[1].job_id,
        jobs[3].job_id,
    ]
    assert [j.job_id for j in ledger.jobs(run.id, JobState.FAILED)] == [jobs[1].job_id]
    assert ledger.jobs(run.id, []) == []
    with pytest.raises(LedgerError, match="unknown job state"):
        ledger.jobs(run.id, ["queued"])
    assert ledger.counts(run.id)["planned"] == 3
    assert ledger.counts(12345) == dict.fromkeys([s.value for s in JobState], 0)


def test_find_done_matches_recipe_params_and_address(ledger: Ledger) -> None:
    params = {"compress": "y", "extra": ["-b", "y"], "merge": 1}
    run = new_run(ledger, params=params)
    done = new_job(ledger, run.id, scan="4")
    pending = new_job(ledger, run.id, scan="5")
    for step in (*PIPELINE, JobState.UPLOADED):
        done = ledger.transition(done.job_id, step)
    ledger.transition(pending.job_id, "staged")
    address = done.address
    same = {"merge": 1.0, "extra": ("-b", "y"), "compress": "y"}  # other order, other types
    assert ledger.find_done("dcm2niix", same, address) == done
    assert ledger.find_done("dcm2niix", {**params, "compress": "n"}, address) is None
    assert ledger.find_done("fslreorient", params, address) is None
    assert ledger.find_done("dcm2niix", params, pending.address) is None
    # A later run of the same conversion finds the earlier run's upload.
    later = new_run(ledger, params=dict(reversed(list(params.items()))))
    assert ledger.find_done(later.recipe, later.params, address) == done


# -- concurrency ---------------------------------------------------------------------------------


def test_two_ledger_objects_on_one_file_see_each_other(path: Path, mode: str) -> None:
    with Ledger(path, mode=mode) as a, Ledger(path, mode=mode) as b:
        run = new_run(a)
        job = new_job(a, run.id)
        assert b.job(job.job_id) == job
        b.transition(job.job_id, "staged")
        assert a.job(job.job_id).state is JobState.STAGED
        with pytest.raises(LedgerError, match="from staged to running"):
            a.transition(job.job_id, "running")  # a's picture of the job is out of date
        assert a.counts(run.id) == b.counts(run.id)


def test_threads_share_one_ledger(ledger: Ledger) -> None:
    run = new_run(ledger)
    jobs = [new_job(ledger, run.id, scan=str(n)) for n in range(4)]

    def work(job_id: int) -> None:
        for step in PIPELINE:
            ledger.transition(job_id, step)

    threads = [threading.Thread(target=work, args=(j.job_id,)) for j in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.counts(run.id)["finished"] == 4


def _work_through(path: str, mode: str, job_ids: list[int]) -> None:
    with Ledger(path, mode=mode) as ledger:
        for job_id in job_ids:
            for step in (*PIPELINE, JobState.UPLOADED):
                ledger.transition(job_id, step, native_id=f"{job_id}.pbs")


def test_processes_writing_at_once_lose_nothing(path: Path, mode: str) -> None:
    workers, per_worker = 4, 10  # 10 jobs x 5 transitions = 50 transitions each
    with Ledger(path, mode=mode) as ledger:
        run = new_run(ledger)
        ids = [new_job(ledger, run.id, scan=str(n)).job_id for n in range(workers * per_worker)]
    procs = [
        mp.Process(target=_work_through, args=(str(path), mode, ids[n::workers]))
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    with Ledger(path, mode=mode) as ledger:
        assert ledger.counts(run.id) == {
            **dict.fromkeys([s.value for s in JobState], 0),
            "uploaded": workers * per_worker,
        }
        assert all(len(ledger.events(i)) == 6 for i in ids)
    assert not Path(f"{path}.lock").exists()


def _die_mid_transition(path: str, mode: str, job_id: int, ready: Any) -> None:
    connect = Ledger._connect

    def traced(self: Ledger) -> sqlite3.Connection:
        conn = connect(self)

        def trace(sql: str) -> None:
            # The job row is already updated in the open transaction; wait here to be killed.
            if sql.lstrip().upper().startswith("INSERT INTO EVENTS"):
                ready.set()
                time.sleep(60)

        conn.set_trace_callback(trace)
        return conn

    Ledger._connect = traced  # type: ignore[method-assign]  # only in this forked child
    with Ledger(path, mode=mode) as ledger:
        ledger.transition(job_id, "running", native_id="never")


def _die_mid_bulk_write(path: str, mode: str, job_id: int, ready: Any) -> None:
    with Ledger(path, mode=mode) as ledger, ledger._tx(write=True) as conn:
        # A tiny page cache makes SQLite spill the uncommitted change to the journal and the
        # database file (or to the WAL), so the kill leaves real half-written state on disk.
        conn.execute("PRAGMA cache_size = 10")
        conn.execute("UPDATE jobs SET log_tail = ?", ("x" * 200_000,))
        conn.execute("UPDATE jobs SET state = 'failed' WHERE id = ?", (job_id,))
        ready.set()
        time.sleep(60)


@pytest.mark.parametrize("child", [_die_mid_transition, _die_mid_bulk_write])
def test_a_writer_killed_mid_transaction_leaves_the_previous_state(
    path: Path, mode: str, child: Any
) -> None:
    with Ledger(path, mode=mode) as ledger:
        run = new_run(ledger)
        for scan in range(20):
            new_job(ledger, run.id, scan=str(scan))
        job = ledger.transition(new_job(ledger, run.id).job_id, "submitted", native_id="1")
        events = ledger.events(job.job_id)
        before = ledger.jobs(run.id)
    ready = mp.Event()
    proc = mp.Process(target=child, args=(str(path), mode, job.job_id, ready))
    proc.start()
    try:
        assert ready.wait(10), "the child never reached the middle of its transaction"
        if mode == "nfs":
            holder = Path(f"{path}.lock").read_text()
            assert holder.startswith(f"{socket.gethostname()}:{proc.pid}:")
        if child is _die_mid_bulk_write:
            half_written = Path(f"{path}-{'wal' if mode == 'wal' else 'journal'}")
            assert half_written.stat().st_size > 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join()  # reaped: a zombie would still count as a live lock holder
    assert proc.exitcode == -signal.SIGKILL
    assert Path(f"{path}.lock").exists() == (mode == "nfs")  # left behind by the dead holder
    with Ledger(path, mode=mode, lock_timeout=2) as ledger:
        assert ledger.jobs(run.id) == before
        assert ledger.events(job.job_id) == events
        assert ledger.transition(job.job_id, "running").state is JobState.RUNNING
    assert not Path(f"{path}.lock").exists()
    assert not Path(f"{path}-journal").exists()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- NFS mode: the lock file ---------------------------------------------------------------------


def test_nfs_mode_holds_the_lock_file_while_it_works(path: Path) -> None:
    with Ledger(path, mode="nfs") as ledger:
        run = new_run(ledger)
        job = new_job(ledger, run.id)
        seen: list[str] = []
        connect = ledger._connect

        def traced() -> sqlite3.Connection:
            conn = connect()
            conn.set_trace_callback(lambda sql: seen.append(ledger.lock_path.read_text()))
            return conn

        ledger._connect = traced  # type: ignore[method-assign]
        ledger.transition(job.job_id, "staged")
        assert seen, "no statement ran"
        assert len(set(seen)) == 1  # one lock held across the whole transaction
        assert seen[0].startswith(f"{socket.gethostname()}:{os.getpid()}:")
        assert not ledger.lock_path.exists()
        assert ledger.lock_path == Path(f"{path}.lock")


def test_a_stale_lock_of_a_dead_process_is_taken_over(path: Path) -> None:
    with Ledger(path, mode="nfs", lock_timeout=5) as ledger:
        run = new_run(ledger)
        dead = subprocess.Popen(["true"])
        dead.wait()
        ledger.lock_path.write_text(f"{socket.gethostname()}:{dead.pid}:0123\n")
        started = time.monotonic()
        assert ledger.run(run.id) == run
        assert time.monotonic() - started < 2
        assert not ledger.lock_path.exists()
        assert not list(path.parent.glob("*.stale"))


def test_an_old_lock_from_another_host_is_taken_over(path: Path) -> None:
    with Ledger(path, mode="nfs", lock_timeout=5, stale_after=600) as ledger:
        ledger.lock_path.write_text("login2.cluster:4242:0123\n")
        old = time.time() - 601
        os.utime(ledger.lock_path, (old, old))
        new_run(ledger)
        assert not ledger.lock_path.exists()


@pytest.mark.parametrize("holder", ["this host, alive", "another host, recent"])
def test_a_live_lock_makes_writers_wait_then_give_up_clearly(path: Path, holder: str) -> None:
    with Ledger(path, mode="nfs", lock_timeout=0.5) as ledger:
        run = new_run(ledger)
        if holder.startswith("this"):
            ledger.lock_path.write_text(f"{socket.gethostname()}:{os.getppid()}:0123\n")
        else:
            ledger.lock_path.write_text("login2.cluster:4242:0123\n")
        content = ledger.lock_path.read_text()
        started = time.monotonic()
        with pytest.raises(LedgerError, match="locked") as err:
            ledger.transition(new_job(ledger, run.id).id, "staged")
        waited = time.monotonic() - started
        assert 0.5 <= waited < 3
        assert str(ledger.lock_path) in str(err.value)
        assert content.rsplit(":", 1)[0] in str(err.value)  # says who holds it
        assert ledger.lock_path.read_text() == content  # a live lock is left alone
        ledger.lock_path.unlink()
        assert ledger.jobs(run.id) == []  # the refused write did not happen
