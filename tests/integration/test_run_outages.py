"""Runs through outages and retries (issue 15): XNAT or the cluster away never fails a scan's
finished work, the run backs off instead of knocking, and `retry` redoes only what failed,
from an empty output folder, so that XNAT ends with exactly one attempt's files.

Against a sandbox XNAT with its fault injection and the local scheduler; the helpers and
fixtures are test_runs.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_runs import (  # noqa: F401  (fixtures are found by name)
    FAST,
    PROVENANCE_FILE,
    T1_SCANS,
    Xnat,
    cli,
    eventually,
    hb,
    local_jobs,
    local_state,
    nothing_left_running,
    states,
    status_json,
    write_recipe,
)

from hpcbridge.sandbox import SandboxServer
from hpcbridge.units import parse_utc_stamp

SCAN = T1_SCANS[0]
HOST = "ssh://nobody@127.0.0.1:1"


@pytest.fixture(name="xnat")
def xnat_view(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Xnat]:
    """test_runs.py's xnat: the default profile pointed at a fresh sandbox of this test's own."""
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    view = Xnat(sandbox, monkeypatch)
    yield view
    view.http.close()


def listing_recipe(tmp_path: Path) -> list[str]:
    recipes = write_recipe(
        tmp_path / "recipes", "listing", "ls {{ input_dir }} > {{ output_dir }}/listing.txt"
    )
    return ["run", "listing", "PTV000", "--scan-type", "*T1*", "--recipes", str(recipes)]


def jobs_ended(home: Path, count: int) -> bool:
    jobs = local_jobs(home)
    ended = [local_state(home, j["id"]).get("state") for j in jobs]
    return len(jobs) == count and all(s == "finished" for s in ended)


def requests_seen(xnat: Xnat) -> int:
    # In-process: an HTTP request for the stats would itself be answered 503 by the faults.
    return sum(xnat.server.stats.snapshot()["requests"].values())


def until_due(data: dict[str, Any]) -> None:
    """Sleep until every waiting scan's next try is due (the backoff is seconds in tests)."""
    due = max(parse_utc_stamp(j["waiting"]["next"]).timestamp() for j in data["jobs"])
    time.sleep(max(0.0, due - time.time()) + 0.1)


# --- item 1: an outage ----------------------------------------------------------------------


def test_an_xnat_outage_leaves_finished_scans_waiting_and_they_upload_once_it_is_back(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("HPCBRIDGE_RETRY_MAX", "1")
    started = cli(*listing_recipe(tmp_path))
    assert started.exit_code == 0, started.output
    eventually(lambda: jobs_ended(isolated_home, 3), "the three jobs to end", timeout=60)

    xnat.server.faults.update({"fail_every": 1})  # XNAT's maintenance: every request a 503
    for n in range(1, 6):
        passed = cli("sync", "1")
        assert passed.exit_code == 0, passed.output
        data = status_json(1)
        assert states(data) == dict.fromkeys(T1_SCANS, "finished")
        for job in data["jobs"]:
            wait = job["waiting"]
            assert (wait["for"], wait["step"], wait["tries"]) == ("XNAT", "upload", n)
            assert "XNAT is unavailable (503 for " in wait["error"]
        if n == 1:
            # One warning for the run, not one per scan.
            warnings = [x for x in passed.stderr.splitlines() if "wait for XNAT" in x]
            assert len(warnings) == 1 and warnings[0].startswith(
                "hpcbridge: warning: 3 scan(s) wait for XNAT, next try at "
            )
            # While it backs off, a pass asks XNAT nothing at all.
            before = requests_seen(xnat)
            quiet = cli("sync", "1")
            assert quiet.exit_code == 0, quiet.output
            assert requests_seen(xnat) == before
            assert [j["waiting"]["tries"] for j in status_json(1)["jobs"]] == [1, 1, 1]
        until_due(data)

    table = cli("status", "1")
    assert table.exit_code == 0, table.output
    rows = [line.split() for line in table.stdout.splitlines()[2:-1]]
    assert [r[1:3] for r in rows] == [["finished,", "waiting"]] * 3
    assert table.stdout.splitlines()[-1] == "3 finished"
    line = next(x for x in table.stderr.splitlines() if x.startswith(f"--- {SCAN}: "))
    job = status_json(1)["jobs"][0]
    since, nxt = job["waiting"]["since"], job["waiting"]["next"]
    assert line.startswith(
        f"--- {SCAN}: waiting for XNAT to upload its outputs since {since} "
        f"(5 tries, next try at {nxt}): XNAT is unavailable (503 for "
    )

    xnat.server.faults.update({"fail_every": 0})
    until_due(status_json(1))
    done = cli("sync", "1")
    assert done.exit_code == 0, done.output
    data = status_json(1)
    assert data["run"]["state"] == "done"
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    assert all(j["waiting"] is None and j["attempts"] == 0 for j in data["jobs"])
    for scan in T1_SCANS:
        assert xnat.files(scan, "RESULT") == sorted(["listing.txt", PROVENANCE_FILE])
    uploads = [n for (_res, name), n in xnat.stored.items() if name == "listing.txt"]
    assert uploads == [1, 1, 1]  # each uploaded exactly once


def test_a_retry_after_from_xnat_is_honoured_and_nothing_is_asked_before(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_RETRY_INTERVAL", "1")
    started = cli(*listing_recipe(tmp_path), "--scan", "4")
    assert started.exit_code == 0, started.output
    eventually(lambda: jobs_ended(isolated_home, 3), "the jobs to end", timeout=60)
    xnat.server.faults.update({"fail_every": 1, "retry_after": 3600})
    first = cli("sync", "1")
    assert first.exit_code == 0, first.output
    waits = [j["waiting"] for j in status_json(1)["jobs"]]
    for wait in waits:
        assert wait["retry_after"] == 3600
        ahead = parse_utc_stamp(wait["next"]).timestamp() - time.time()
        assert 3500 < ahead <= 3601
    before = requests_seen(xnat)
    xnat.server.faults.update({"fail_every": 0})  # back early: still not asked before the hour
    again = cli("sync", "1")
    assert again.exit_code == 0, again.output
    assert requests_seen(xnat) == before
    assert states(status_json(1)) == dict.fromkeys(T1_SCANS, "finished")


def test_an_unreachable_ssh_host_leaves_scans_planned_and_waiting(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 1: every connection is refused, as with a login node that is down.
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        "[profiles.default]\n"
        f'host = "{HOST}"\nscheduler = "slurm"\n'
        f'work_root = "{tmp_path / "cluster"}"\nretry_interval = 0.5\nretry_max = 1\n'
    )
    started = cli(*listing_recipe(tmp_path), "--scan", "4")
    assert started.exit_code == 0, started.output
    for n in range(1, 4):
        data = status_json(1)
        assert states(data) == dict.fromkeys(T1_SCANS, "planned")
        # The first scan found the host away; the pass then left the others alone.
        first, *others = [j["waiting"] for j in data["jobs"]]
        assert others == [None, None]
        assert (first["for"], first["step"], first["tries"]) == (HOST, "stage-in", n)
        assert "127.0.0.1" in first["error"]
        until_due({"jobs": data["jobs"][:1]})
        passed = cli("sync", "1")
        assert passed.exit_code == 0, passed.output
    assert data["run"]["state"] == "active"


# --- item 2: retry redoes only what failed -------------------------------------------------


def counting_recipe(tmp_path: Path, extra: str = "") -> tuple[list[str], Path]:
    """A job that counts its runs outside out/ and, like dcm2niix, never overwrites: it writes
    X.txt, or Xa.txt beside an X.txt already there."""
    counter = tmp_path / "runs"
    recipes = write_recipe(
        tmp_path / "recipes",
        "counting",
        f"echo run >> '{counter}'\n"
        "if [ -e {{ output_dir }}/X.txt ]; then echo again > {{ output_dir }}/Xa.txt; "
        "else echo first > {{ output_dir }}/X.txt; fi\n" + extra,
    )
    address = "PTV000/Haofei01/Haofei01_MR1"
    return ["run", "counting", address, "--scan", "4", "--recipes", str(recipes)], counter


def test_retry_after_a_refused_upload_uploads_again_without_running_the_job_again(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "leave-a-link"
    flag.touch()
    args, counter = counting_recipe(
        tmp_path, f"if [ -e '{flag}' ]; then ln -s /etc/hostname {{{{ output_dir }}}}/link.txt; fi"
    )
    failed = hb(*args, "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "failed" and job["exit_code"] == 0
    assert "link.txt" in job["error"]
    assert xnat.files(SCAN, "RESULT") == []

    # The user removes what the job should not have left, and retries.
    flag.unlink()
    (Path(job["work_dir"]) / "out" / "link.txt").unlink()
    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert "run 1: retrying 1 job(s), 1 of them only to upload again" in retried.stderr
    assert "submitted as job" not in retried.stderr
    assert f"{SCAN}: uploaded 2 file(s)" in retried.stderr

    after = status_json(1)["jobs"][0]
    assert after["state"] == "uploaded"
    assert after["job_id"] == job["job_id"] and after["exit_code"] == 0
    assert after["attempts"] == 1 and after["error"] is None
    assert counter.read_text().splitlines() == ["run"]  # the job ran once
    assert len(local_jobs(isolated_home)) == 1
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])
    assert xnat.file(SCAN, "RESULT", "X.txt") == b"first\n"


def test_a_recomputed_scan_starts_from_an_empty_output_folder_and_replaces_xnats_files(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    # Files of an earlier attempt under other names are in the resource already.
    resource = f"{xnat._scan(SCAN)}/resources/RESULT"
    assert xnat.http.put(resource, timeout=10).status_code in (200, 201)
    put = xnat.http.put(
        f"{resource}/files/Xa.txt", params={"inbody": "true"}, data=b"stale\n", timeout=10
    )
    assert put.status_code in (200, 201), put.text
    assert xnat.files(SCAN, "RESULT") == ["Xa.txt"]

    flag = tmp_path / "fail-first"
    flag.touch()
    args, counter = counting_recipe(tmp_path, f"if [ -e '{flag}' ]; then exit 3; fi")
    failed = hb(*args, "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "failed" and job["exit_code"] == 3
    folder = Path(job["work_dir"])
    assert (folder / "out" / "X.txt").read_text() == "first\n"

    flag.unlink()
    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert retried.stderr.count("submitted as job") == 1
    # The first attempt's result is kept aside until the new one is in XNAT.
    assert (folder / "out.attempt-0" / "X.txt").read_text() == "first\n"
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr

    job = status_json(1)["jobs"][0]
    assert job["state"] == "uploaded" and job["attempts"] == 1
    assert counter.read_text().splitlines() == ["run", "run"]
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["X.txt", PROVENANCE_FILE]
    # The moved-aside folder is gone once the new result is verified in XNAT.
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("out")) == ["out"]
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])
    assert xnat.file(SCAN, "RESULT", "X.txt") == b"first\n"
    prov = xnat.json_file(SCAN, "RESULT", PROVENANCE_FILE)
    assert prov["files"] == ["X.txt"]
    assert json.loads(json.dumps(job["uploaded"]))[0]["name"] == "X.txt"


def test_retry_of_a_chain_whose_stage_out_job_failed_submits_only_a_new_stage_out_job(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    import shlex
    import sys

    real = shlex.join([sys.executable, "-m", "hpcbridge"])
    flag = tmp_path / "stage-out-fails"
    flag.touch()
    fake = tmp_path / "bridge.sh"  # the real bridge, but its stage-out fails while the flag is
    fake.write_text(
        f'case "$*" in *stage-out*) [ -e \'{flag}\' ] && exit 4;; esac\nexec {real} "$@"\n'
    )
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        f'[profiles.default]\nbridge_command = "/bin/sh {fake}"\n'
    )
    args, counter = counting_recipe(tmp_path)
    failed = hb(*args, "--chain", "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "failed" and job["error"].startswith("stage-out job 3 failed")

    flag.unlink()
    retried = cli("retry", "1")
    assert retried.exit_code == 0, retried.output
    assert f"{SCAN}: submitted as jobs 1 -> 2 -> 4 (stage-in -> compute -> stage-out)" in (
        retried.stderr
    )
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert status_json(1)["jobs"][0]["state"] == "uploaded"
    assert len(local_jobs(isolated_home)) == 4  # one new job: the stage-out
    assert counter.read_text().splitlines() == ["run"]  # computed once
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])


def test_a_scheduler_that_cannot_be_asked_leaves_the_jobs_be_and_the_run_backs_off(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbridge.config import load_settings
    from hpcbridge.errors import TransportError
    from hpcbridge.ledger import Ledger
    from hpcbridge.runs import RunRequest, start_run, waiting
    from hpcbridge.runs.sync import sync
    from hpcbridge.schedulers.local import LocalScheduler
    from hpcbridge.xnat import connect

    monkeypatch.setenv("HPCBRIDGE_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("HPCBRIDGE_RETRY_MAX", "1")
    recipes = write_recipe(
        tmp_path / "recipes", "listing", "ls {{ input_dir }} > {{ output_dir }}/listing.txt"
    )
    settings = load_settings()
    scheduler = LocalScheduler(isolated_home / "local-jobs")
    asked: list[list[str]] = []

    def away(ids: Any) -> Any:
        asked.append(list(ids))
        raise TransportError("`squeue -h -j 1,2,3` did not finish within 60 s")

    request = RunRequest("listing", "PTV000", ("4",), recipe_dirs=(recipes,))
    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(settings, client, ledger, request)
        assert plan.run is not None
        sync(settings, client, ledger, scheduler, plan.run)  # submits the three
        eventually(lambda: jobs_ended(isolated_home, 3), "the three jobs to end", timeout=60)
        real = scheduler.status
        monkeypatch.setattr(scheduler, "status", away)
        for n in range(1, 4):
            report = sync(settings, client, ledger, scheduler, plan.run)
            assert report.failed == [] and not report.done
            rows = ledger.jobs(plan.run.id)
            assert {r.state.value for r in rows} == {"submitted"}
            waits = [waiting(r) for r in rows]
            assert all(w is not None for w in waits)
            assert {(w["for"], w["step"], w["tries"]) for w in waits if w} == {
                ("the scheduler", "poll", n)
            }
            # Backing off: the next pass does not ask the scheduler before its time.
            seen = len(asked)
            sync(settings, client, ledger, scheduler, plan.run)
            assert len(asked) == seen == n
            until_due({"jobs": [{"waiting": w} for w in waits]})
        monkeypatch.setattr(scheduler, "status", real)
        report = sync(settings, client, ledger, scheduler, plan.run)
        rows = ledger.jobs(plan.run.id)
    assert report.done and [r.state.value for r in rows] == ["uploaded"] * 3
    assert all(waiting(r) is None for r in rows)


def test_retry_rerun_runs_the_job_again_from_an_empty_folder_even_where_only_its_upload_failed(
    xnat: Xnat, isolated_home: Path, tmp_path: Path
) -> None:
    flag = tmp_path / "leave-a-link"
    flag.touch()
    args, counter = counting_recipe(
        tmp_path, f"if [ -e '{flag}' ]; then ln -s /etc/hostname {{{{ output_dir }}}}/link.txt; fi"
    )
    failed = hb(*args, "--wait", *FAST)
    assert failed.returncode == 3, failed.stderr
    flag.unlink()  # the recipe is fixed; its outputs must be made again
    retried = cli("retry", "1", "--rerun")
    assert retried.exit_code == 0, retried.output
    assert "run 1: retrying 1 job(s)\n" in retried.stderr
    assert retried.stderr.count("submitted as job 2") == 1
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert counter.read_text().splitlines() == ["run", "run"]
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])
    assert xnat.file(SCAN, "RESULT", "X.txt") == b"first\n"


# --- item 1 in a chain: XNAT away while a transfer job runs ---------------------------------


def chain_state(home: Path, job_id: str) -> str | None:
    return local_state(home, job_id).get("state")


def test_a_chain_whose_stage_out_job_finds_xnat_away_waits_and_submits_only_a_new_stage_out(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_RETRY_INTERVAL", "0.5")
    monkeypatch.setenv("HPCBRIDGE_RETRY_MAX", "1")
    gate = tmp_path / "compute-may-end"  # the outage begins while the compute job runs
    args, counter = counting_recipe(tmp_path, f"while [ ! -e '{gate}' ]; do sleep 0.1; done")
    started = cli(*args, "--chain")
    assert started.exit_code == 0, started.output
    eventually(lambda: chain_state(isolated_home, "2") == "running", "the compute job to run")
    xnat.server.faults.update({"fail_every": 1})
    gate.touch()
    eventually(lambda: chain_state(isolated_home, "3") == "failed", "the stage-out job to end")
    assert local_state(isolated_home, "3")["exit_code"] == 75

    for n, stage_out_job in ((1, "3"), (2, "4")):
        passed = cli("sync", "1")
        assert passed.exit_code == 0, passed.output
        assert f"{SCAN}: stage-out job {stage_out_job} found XNAT away; next try at " in (
            passed.stderr
        )
        assert "hpcbridge: warning: " in passed.stderr and "waits for XNAT" in passed.stderr
        data = status_json(1)
        job = data["jobs"][0]
        assert job["state"] == "planned" and job["error"] is None  # not failed
        wait = job["waiting"]
        assert (wait["for"], wait["step"], wait["tries"]) == ("XNAT", "upload", n)
        assert wait["error"].startswith("XNAT is unavailable (503 for ")  # the job's own words
        table = cli("status", "1")
        assert f"--- {SCAN}: waiting for XNAT to upload its outputs since " in table.stderr
        if n == 2:
            break
        until_due(data)
        resubmitted = cli("sync", "1")  # XNAT is still away: the new stage-out job fails too
        assert resubmitted.exit_code == 0, resubmitted.output
        assert f"{SCAN}: submitted as jobs 1 -> 2 -> 4 (stage-in -> compute -> stage-out)" in (
            resubmitted.stderr
        )
        assert status_json(1)["jobs"][0]["waiting"] is None  # in the scheduler, not waiting
        eventually(lambda: chain_state(isolated_home, "4") == "failed", "stage-out job 4 to end")

    xnat.server.faults.update({"fail_every": 0})
    until_due(status_json(1))
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert "submitted as jobs 1 -> 2 -> 5 (stage-in -> compute -> stage-out)" in done.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "uploaded" and job["waiting"] is None
    assert len(local_jobs(isolated_home)) == 5  # stage-in, compute, three stage-outs
    assert counter.read_text().splitlines() == ["run"]  # computed once
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])
    uploads = [n for (_res, name), n in xnat.stored.items() if name == "X.txt"]
    assert uploads == [1]


def test_a_chain_whose_stage_in_job_finds_xnat_away_waits_and_submits_the_chain_again(
    xnat: Xnat, isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shlex
    import sys

    real = shlex.join([sys.executable, "-m", "hpcbridge"])
    gate = tmp_path / "stage-in-may-start"  # the outage begins before the stage-in job's start
    fake = tmp_path / "bridge.sh"
    fake.write_text(
        f"case \"$*\" in *stage-in*) while [ ! -e '{gate}' ]; do sleep 0.1; done;; esac\n"
        f'exec {real} "$@"\n'
    )
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        f'[profiles.default]\nbridge_command = "/bin/sh {fake}"\n'
        "retry_interval = 0.5\nretry_max = 1\n"
    )
    args, counter = counting_recipe(tmp_path)
    started = cli(*args, "--chain")
    assert started.exit_code == 0, started.output
    xnat.server.faults.update({"fail_every": 1, "retry_after": 2})
    gate.touch()
    eventually(lambda: chain_state(isolated_home, "1") == "failed", "the stage-in job to end")
    assert local_state(isolated_home, "1")["exit_code"] == 75

    passed = cli("sync", "1")
    assert passed.exit_code == 0, passed.output
    assert f"{SCAN}: stage-in job 1 found XNAT away; next try at " in passed.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "planned" and job["error"] is None
    wait = job["waiting"]
    assert (wait["for"], wait["step"], wait["tries"]) == ("XNAT", "stage-in", 1)
    assert wait["error"].startswith("XNAT is unavailable (503 for ")
    assert wait["retry_after"] == 2  # from the job's report: XNAT's Retry-After
    ahead = parse_utc_stamp(wait["next"]).timestamp() - time.time()
    assert 1 < ahead <= 3
    # The chain's later jobs never ran, and are cancelled: nothing of it is left to run.
    from hpcbridge.jobs import JobStore

    records = JobStore(isolated_home, "default")
    assert [getattr(records.get(i), "state", None) for i in ("2", "3")] == ["cancelled"] * 2

    xnat.server.faults.update({"fail_every": 0})
    until_due(status_json(1))
    done = hb("sync", "1", "--watch", *FAST)
    assert done.returncode == 0, done.stderr
    assert "submitted as jobs 4 -> 5 -> 6 (stage-in -> compute -> stage-out)" in done.stderr
    job = status_json(1)["jobs"][0]
    assert job["state"] == "uploaded" and job["waiting"] is None
    assert counter.read_text().splitlines() == ["run"]
    assert xnat.files(SCAN, "RESULT") == sorted(["X.txt", PROVENANCE_FILE])
    uploads = [n for (_res, name), n in xnat.stored.items() if name == "X.txt"]
    assert uploads == [1]


def test_stage_in_and_stage_out_exit_75_when_xnat_is_away_and_1_when_the_request_is_wrong(
    xnat: Xnat, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("a\n")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"outputs": [{"glob": "*.txt", "resource": "R"}], "provenance": {}}))
    report = tmp_path / "away.json"
    report.write_text("an earlier job's")
    xnat.server.faults.update({"fail_every": 1, "retry_after": 30})
    away = cli("stage-out", SCAN, "--spec", str(spec), "--away-report", str(report), str(out))
    assert away.exit_code == 75, away.output
    lines = away.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcbridge: error: XNAT is unavailable (503 ")
    said = json.loads(report.read_text())
    assert said["transient"] is True and said["for"] == "XNAT" and said["retry_after"] == 30
    assert said["error"].startswith("XNAT is unavailable (503 for ")
    staged = cli("stage-in", SCAN, "--dest", str(tmp_path / "in"), "--away-report", str(report))
    assert staged.exit_code == 75, staged.output
    assert staged.stderr.startswith("hpcbridge: error: XNAT is unavailable (503 ")

    xnat.server.faults.update({"fail_every": 0})
    wrong = cli(
        "stage-in", SCAN + "9", "--dest", str(tmp_path / "in"), "--away-report", str(report)
    )
    assert wrong.exit_code == 1, wrong.output
    assert not report.exists()  # an earlier job's report does not outlive this one's outcome
