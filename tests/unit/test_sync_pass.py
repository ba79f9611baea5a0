"""The sync pass of a single-job run (runs/sync.py) over a fake cluster: submitting up to
max_queued, judging jobs the scheduler forgot by their status files, staging out and uploading
what finished, riding out a poll that fails, cancelling after a failure, and asking again about
ids a scheduler would not answer for in a list. The XNAT is a sandbox on loopback; the ledger,
job records, scheduler classes and files are the real ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from fakes import Bridge

from hpcbridge.errors import TransportError
from hpcbridge.ledger import JobState, Run, RunState
from hpcbridge.runs import cancel_run
from hpcbridge.sandbox import SandboxServer
from hpcbridge.schedulers.outcome import STATUS_FILE_GRACE

T1 = [f"PTV000/{s}/{s}_MR1/4" for s in ("Haofei01", "Haofei02", "Haofei03")]
ONE = "PTV000/Haofei01/Haofei01_MR1"


def states(bridge: Bridge, run: Run) -> dict[str, str]:
    return {row.address: row.state.value for row in bridge.rows(run)}


def commands(bridge: Bridge, name: str) -> list[list[str]]:
    return [argv for argv in bridge.cluster.calls if argv[0] == name]


def stored_files(sandbox: SandboxServer, scan: str, resource: str) -> list[str]:
    project, subject, experiment, scan_id = scan.split("/")
    url = (
        f"{sandbox.url}/data/projects/{project}/subjects/{subject}/experiments/{experiment}"
        f"/scans/{scan_id}/resources/{resource}/files"
    )
    resp = requests.get(
        url, params={"format": "json"}, auth=(sandbox.user, sandbox.password), timeout=10
    )
    resp.raise_for_status()
    return sorted(r["Name"] for r in resp.json()["ResultSet"]["Result"])


def test_a_pass_submits_planned_scans_up_to_max_queued_and_polls_them_in_one_call(
    bridge: Bridge,
) -> None:
    run = bridge.start("PTV000", scan_types=("*T1*",), max_queued=2)
    first = bridge.sync(run)
    assert [row.address for row in first.submitted] == T1[:2]
    assert states(bridge, run) == {T1[0]: "submitted", T1[1]: "submitted", T1[2]: "planned"}
    # staged in before its job was submitted: the DICOM files are in the job's input folder
    folder = bridge.cluster.work_dir(first.submitted[0].native_id or "")
    assert len(list((folder / "resources" / "DICOM" / "files").iterdir())) == 12

    assert bridge.sync(run).submitted == []  # two in the scheduler: none more
    assert len(commands(bridge, "qsub")) == 2
    bridge.cluster.finish(first.submitted[0].native_id or "", files={"out/count.txt": "12\n"})
    third = bridge.sync(run)
    assert [row.address for row in third.submitted] == [T1[2]]
    # each pass after the first asked the scheduler once, about every job it had
    assert [argv[-2:] for argv in commands(bridge, "qstat")] == [["1.vm", "2.vm"]] * 2


def test_a_finished_job_is_staged_out_and_uploaded_and_the_run_ends(
    bridge: Bridge, sandbox: SandboxServer
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    bridge.cluster.finish(job.native_id or "", files={"out/count.txt": "12\n"})
    report = bridge.sync(run)
    (row,) = report.uploaded
    assert (row.state, row.exit_code) == (JobState.UPLOADED, 0)
    assert sorted(u["name"] for u in row.uploaded) == ["count.txt", "hpcbridge-provenance.json"]
    assert stored_files(sandbox, T1[0], "RESULT") == ["count.txt", "hpcbridge-provenance.json"]
    assert report.run.state is RunState.DONE
    assert f"{T1[0]}: uploaded 2 file(s)" in bridge.events


def test_a_job_that_wrote_no_outputs_is_tried_once_more_then_fails_to_be_computed_again(
    bridge: Bridge,
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    # exit code 0, and nothing the recipe uploads (*.txt)
    bridge.cluster.finish(job.native_id or "", files={"out/count.csv": "12\n"})
    report = bridge.sync(run)
    assert report.failed == [] and "stage-out failed, will retry once at" in report.errors[0]
    assert states(bridge, run) == {T1[0]: "finished"}
    bridge.time_passes(run)
    (row,) = bridge.sync(run).failed
    assert (row.last_error or "").startswith("stage-out failed: the job wrote no output matching")
    assert row.extra["failed_step"] == "compute"  # a retry runs the job again, not the upload


@pytest.mark.parametrize(
    ("exit_code", "state", "error"), [(0, "uploaded", None), (3, "failed", "exit code 3")]
)
def test_a_job_the_scheduler_forgot_between_polls_is_judged_by_its_status_file(
    bridge: Bridge, exit_code: int, state: str, error: str | None
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    bridge.cluster.finish(job.native_id or "", exit_code, {"out/count.txt": "12\n"}, forgotten=True)
    bridge.sync(run)
    (row,) = bridge.rows(run)
    assert (row.state.value, row.exit_code, row.last_error) == (state, exit_code, error)


def test_a_job_the_scheduler_forgot_before_it_started_is_cancelled_not_finished(
    bridge: Bridge,
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    bridge.cluster.set_state(job.native_id or "", None)
    report = bridge.sync(run)
    (row,) = report.failed
    assert row.state is JobState.CANCELLED
    assert row.last_error == "ended before it started (cancelled, or its dependencies failed)"


def test_a_job_killed_without_a_status_file_fails_with_the_schedulers_reason(
    bridge: Bridge,
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    bridge.cluster.set_state(job.native_id or "", "walltime")
    (row,) = bridge.sync(run).failed
    assert row.state is JobState.FAILED
    assert (row.last_error or "").startswith("killed: walltime 00:00:05 exceeded; raise walltime")


def test_a_started_job_gone_without_a_status_file_waits_out_the_grace_then_fails(
    bridge: Bridge,
) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    native_id = job.native_id or ""
    bridge.cluster.start(native_id)
    bridge.sync(run)
    bridge.cluster.set_state(native_id, None)  # killed too hard for its trap to write
    assert bridge.sync(run).failed == []  # the file may show up late on a network disk
    assert states(bridge, run) == {T1[0]: "running"}
    store = bridge.session.store
    seen = store.get(native_id)
    assert seen is not None and seen.ended_seen is not None
    store.save(replace(seen, ended_seen=seen.ended_seen - STATUS_FILE_GRACE))
    (row,) = bridge.sync(run).failed
    assert row.state is JobState.FAILED
    assert row.last_error == (
        "ended without recording an exit code (killed: walltime, memory or node failure?)"
    )


def test_a_poll_that_fails_keeps_the_jobs_and_counts_the_failure(bridge: Bridge) -> None:
    run = bridge.start(ONE, "4")
    (job,) = bridge.sync(run).submitted
    native_id = job.native_id or ""
    bridge.cluster.start(native_id)
    for tries in (1, 2):
        bridge.cluster.fail_next["qstat"] = TransportError("ssh: the connection dropped")
        report = bridge.sync(run)
        assert report.failed == [] and report.run.state is RunState.ACTIVE
        assert report.errors[0] == "could not poll the scheduler: ssh: the connection dropped"
        (row,) = bridge.rows(run)
        assert row.state is JobState.SUBMITTED
        waiting = row.extra["waiting"]
        assert (waiting["for"], waiting["step"], waiting["tries"]) == (
            "the scheduler",
            "poll",
            tries,
        )
        polls = len(commands(bridge, "qstat"))
        bridge.sync(run)  # backing off: the scheduler is not asked before the next try is due
        assert len(commands(bridge, "qstat")) == polls
        bridge.time_passes(run)
    bridge.sync(run)
    (row,) = bridge.rows(run)
    assert row.state is JobState.RUNNING and "waiting" not in row.extra


def test_cancelling_a_run_after_a_failure_cancels_only_the_live_jobs(bridge: Bridge) -> None:
    run = bridge.start("PTV000", scan_types=("*T1*",))
    failing, *live = [row.native_id or "" for row in bridge.sync(run).submitted]
    bridge.cluster.finish(failing, 2)
    assert [row.address for row in bridge.sync(run).failed] == [T1[0]]
    session = bridge.session
    cancel_run(session.ledger, session.scheduler, bridge.ledger.run(run.id), session.store)
    assert commands(bridge, "qdel") == [["qdel", *live]]
    assert states(bridge, run) == {T1[0]: "failed", T1[1]: "cancelled", T1[2]: "cancelled"}
    assert bridge.ledger.run(run.id).state is RunState.CANCELLED
    calls = len(bridge.cluster.calls)
    assert bridge.sync(run).done and len(bridge.cluster.calls) == calls  # nothing more asked


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_ids_a_scheduler_would_not_answer_for_in_a_list_are_asked_again_alone(
    make_bridge: Callable[..., Bridge], kind: str
) -> None:
    bridge = make_bridge(scheduler=kind)
    bridge.cluster.stop_at_unknown = True  # PBS: qstat stops at the first unknown id
    run = bridge.start("PTV000", scan_types=("*T1*",))
    gone, live, last = [row.native_id or "" for row in bridge.sync(run).submitted]
    bridge.cluster.start(live)
    bridge.cluster.start(last)
    bridge.cluster.finish(gone, files={"out/count.txt": "12\n"}, forgotten=True)
    bridge.sync(run)
    assert states(bridge, run) == {T1[0]: "uploaded", T1[1]: "running", T1[2]: "running"}
    asked = commands(bridge, "squeue" if kind == "slurm" else "qstat")
    # Slurm refuses the whole list: each id is asked alone. PBS answers up to the id it names
    # as unknown: each one after it is asked alone, the unknown one not again.
    alone = [[gone], [live], [last]] if kind == "slurm" else [[live], [last]]
    assert [ids_of(argv) for argv in asked] == [[gone, live, last], *alone]


def ids_of(argv: list[str]) -> list[str]:
    if argv[0] == "squeue":
        return argv[argv.index("-j") + 1].split(",")
    return [a for a in argv[1:] if not a.startswith("-") and a != "json"]


def test_a_retry_launched_within_the_second_of_its_attempt_gets_its_own_history_entry(
    tmp_path: Path,
) -> None:
    # XNAT finds a History entry by experiment, pipeline and launch time to the second.
    from hpcbridge.ledger import Ledger
    from hpcbridge.runs.context import next_launch

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        run = ledger.create_run(recipe="r", params={}, target="P", profile="p", options={})
        row = ledger.add_job(
            run.id, address="P/S/E/4", project="P", subject="S", experiment="E", scan="4", name="x"
        )
        first = ledger.update(row.job_id, extra={"launched": "2026-12-08T01:02:03Z"})
    assert next_launch(row, "2026-12-08T01:02:03Z") == "2026-12-08T01:02:03Z"
    assert next_launch(first, "2026-12-08T01:02:03Z") == "2026-12-08T01:02:04Z"
    assert next_launch(first, "2026-12-08T01:05:00Z") == "2026-12-08T01:05:00Z"
