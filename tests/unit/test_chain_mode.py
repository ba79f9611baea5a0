"""Chain mode (runs/chained.py) over a fake cluster: a scan's stage-in, compute and stage-out
jobs linked by afterok, a failed stage-in cancelling the jobs that wait for it, a finished chain
marking its scan uploaded, and a chain's state carried across a restart, even one that cut its
submission short. The XNAT is a sandbox on loopback (it issues the chain's token); the ledger,
job records, scheduler classes and files are the real ones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import ENDED, Bridge

from hpcbridge.errors import TransportError
from hpcbridge.ledger import JobState, Run, RunState
from hpcbridge.runs import cancel_run

EXPERIMENT = "PTV000/Haofei01/Haofei01_MR1"
SCAN = EXPERIMENT + "/4"
# What a stage-out job reports it uploaded (the fake job uploads nothing itself).
REPORT = {"uploaded": [{"name": "count.txt", "resource": "RESULT", "size": 3, "md5": "0" * 32}]}


def chain_of(bridge: Bridge, run: Run) -> dict[str, str]:
    (row,) = bridge.rows(run)
    chain: dict[str, str] = row.extra["chain"]
    return chain


def token_file(bridge: Bridge, run: Run) -> Path:
    return Path(f"{bridge.settings.work_root}/run-{run.id}/.hpcbridge-chain/credentials.json")


def finish_chain(bridge: Bridge, chain: dict[str, str]) -> None:
    bridge.cluster.finish(chain["stage-in"])
    bridge.cluster.finish(chain["compute"], files={"out/count.txt": "12\n"})
    bridge.cluster.finish(chain["stage-out"], files={"uploaded.json": json.dumps(REPORT)})


def test_a_chain_is_three_jobs_each_submitted_after_the_one_before(bridge: Bridge) -> None:
    run = bridge.start(EXPERIMENT, "4", chain=True)
    (row,) = bridge.sync(run).submitted
    chain = chain_of(bridge, run)
    assert chain == {"stage-in": "1.vm", "compute": "2.vm", "stage-out": "3.vm"}
    assert (row.state, row.native_id) == (JobState.SUBMITTED, "2.vm")
    qsubs = bridge.cluster.submitted
    assert not any(arg.startswith("depend=") for arg in qsubs["1.vm"])
    assert qsubs["2.vm"][1:3] == ["-W", "depend=afterok:1.vm"]
    assert qsubs["3.vm"][1:3] == ["-W", "depend=afterok:2.vm"]
    # the transfer jobs go to the transfer queue; the compute job to the profile's own
    scripts = {step: Path(qsubs[i][-1]).read_text() for step, i in chain.items()}
    assert "#PBS -q dtq" in scripts["stage-in"] and "#PBS -q dtq" in scripts["stage-out"]
    assert "#PBS -q" not in scripts["compute"]
    assert f"{SCAN}: submitted as jobs 1.vm -> 2.vm -> 3.vm" in bridge.events[0]
    # the transfer jobs' token waits in the run's folder, for the user's eyes only
    assert token_file(bridge, run).stat().st_mode & 0o777 == 0o600
    # this machine staged nothing in: the stage-in job does
    assert not (bridge.cluster.work_dir("2.vm") / "resources").exists()


@pytest.mark.parametrize("kind", ["pbs", "slurm"])
def test_a_failed_stage_in_cancels_the_jobs_that_wait_for_it(
    make_bridge: Callable[..., Bridge], kind: str
) -> None:
    bridge = make_bridge(scheduler=kind)
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    chain = chain_of(bridge, run)
    stage_in, compute, stage_out = chain["stage-in"], chain["compute"], chain["stage-out"]
    afterok = "depend=afterok:" if kind == "pbs" else "--dependency=afterok:"
    assert afterok + stage_in in bridge.cluster.submitted[compute]
    assert afterok + compute in bridge.cluster.submitted[stage_out]
    bridge.cluster.finish(stage_in, 1)
    report = bridge.sync(run)
    (row,) = report.failed
    assert row.state is JobState.FAILED
    assert row.last_error == f"stage-in job {stage_in} failed: exit code 1"
    assert row.extra["failed_step"] == "stage-in"  # a retry submits the whole chain again
    # Slurm would leave them pending forever (DependencyNeverSatisfied): each is cancelled,
    # the compute job for the stage-in, the stage-out job for the compute job
    cancel = "qdel" if kind == "pbs" else "scancel"
    assert [argv for argv in bridge.cluster.calls if argv[0] == cancel] == [
        [cancel, compute],
        [cancel, stage_out],
    ]
    assert bridge.cluster.jobs[compute] == bridge.cluster.jobs[stage_out] == ENDED[kind]
    store = bridge.session.store
    for job_id, parent in ((compute, stage_in), (stage_out, compute)):
        job = store.get(job_id)
        assert job is not None and job.state == "cancelled"
        assert job.reason.startswith(f"cancelled by hpcbridge: job {parent} it depends on")
    assert report.run.state is RunState.DONE
    assert not token_file(bridge, run).exists()  # the run ended: its token is of no more use


def test_a_finished_chain_marks_its_scan_uploaded_from_the_stage_out_report(
    bridge: Bridge,
) -> None:
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    chain = chain_of(bridge, run)
    bridge.cluster.finish(chain["stage-in"])
    bridge.sync(run)
    (row,) = bridge.rows(run)
    assert (row.state, row.raw_state) == (JobState.RUNNING, "compute H")
    finish_chain(bridge, chain)
    report = bridge.sync(run)
    (row,) = report.uploaded
    assert (row.state, row.exit_code, row.uploaded) == (JobState.UPLOADED, 0, REPORT["uploaded"])
    assert report.run.state is RunState.DONE
    assert not token_file(bridge, run).exists()


def test_a_chain_goes_on_after_a_restart_without_submitting_anything_twice(
    bridge: Bridge,
) -> None:
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    chain = chain_of(bridge, run)
    bridge.restart()  # a new process: new ledger handle, job records and scheduler
    finish_chain(bridge, chain)
    (row,) = bridge.sync(run).uploaded
    assert row.extra["chain"] == chain
    assert len(bridge.cluster.submitted) == 3


def test_a_chain_cut_short_by_a_lost_connection_is_completed_not_repeated(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compute job's qsub reached the server, but its answer was lost with the connection:
    after a restart the job is found by its name and adopted, and only the stage-out job is
    submitted, after it."""
    qsub = bridge.cluster._qsub

    def lost_on_the_second(args: list[str]) -> tuple[int, str, str]:
        answer = qsub(args)
        if len(bridge.cluster.submitted) == 2:
            raise TransportError("ssh: the connection dropped")
        return answer

    monkeypatch.setattr(bridge.cluster, "_qsub", lost_on_the_second)
    run = bridge.start(EXPERIMENT, "4", chain=True)
    report = bridge.sync(run)
    assert report.submitted == [] and report.failed == []
    (row,) = bridge.rows(run)
    assert row.state is JobState.PLANNED and row.extra["chain"] == {"stage-in": "1.vm"}
    assert row.extra["waiting"]["step"] == "submit"

    bridge.restart()
    bridge.time_passes(run)
    (row,) = bridge.sync(run).submitted
    assert row.extra["chain"] == {"stage-in": "1.vm", "compute": "2.vm", "stage-out": "3.vm"}
    assert sorted(bridge.cluster.submitted) == ["1.vm", "2.vm", "3.vm"]  # no second compute
    assert ["qselect", "-x", "-N", row.name] in bridge.cluster.calls
    assert bridge.cluster.submitted["3.vm"][1:3] == ["-W", "depend=afterok:2.vm"]


def test_a_stage_out_job_that_found_xnat_away_waits_and_is_submitted_again_alone(
    bridge: Bridge,
) -> None:
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    chain = chain_of(bridge, run)
    bridge.cluster.finish(chain["stage-in"])
    bridge.cluster.finish(chain["compute"], files={"out/count.txt": "12\n"})
    away = {"error": "XNAT is down for maintenance (503)", "retry_after": 120}
    bridge.cluster.finish(chain["stage-out"], 75, {"xnat-away.json": json.dumps(away)})
    report = bridge.sync(run)
    assert report.failed == [] and report.submitted == []
    (row,) = bridge.rows(run)
    assert row.state is JobState.PLANNED
    assert row.extra["chain"] == {"stage-in": "1.vm", "compute": "2.vm"}  # kept: they did well
    waiting = row.extra["waiting"]
    assert (waiting["for"], waiting["step"], waiting["error"]) == ("XNAT", "upload", away["error"])
    assert bridge.sync(run).submitted == []  # not before the wait is over

    bridge.time_passes(run)
    (row,) = bridge.sync(run).submitted
    assert row.extra["chain"] == {"stage-in": "1.vm", "compute": "2.vm", "stage-out": "4.vm"}
    # the compute job has ended well: the new stage-out job depends on nothing
    assert not any(arg.startswith("depend=") for arg in bridge.cluster.submitted["4.vm"])
    assert len(bridge.cluster.submitted) == 4


def test_a_chain_resumed_after_its_stage_in_ended_and_was_forgotten_is_completed(
    make_bridge: Callable[..., Bridge], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops before the compute job's sbatch reaches the server; by the next
    sync (cron, a quarter of an hour later) the stage-in job has ended well and slurmctld has
    purged it. Nothing failed: the chain should go on from its compute job."""
    bridge = make_bridge(scheduler="slurm")
    sbatch = bridge.cluster._sbatch

    def lost_on_the_second(args: list[str]) -> tuple[int, str, str]:
        if len(bridge.cluster.submitted) == 1:
            raise TransportError("ssh: the connection dropped")
        return sbatch(args)

    monkeypatch.setattr(bridge.cluster, "_sbatch", lost_on_the_second)
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    assert chain_of(bridge, run) == {"stage-in": "1"}
    bridge.cluster.finish("1", forgotten=True)
    monkeypatch.setattr(bridge.cluster, "_sbatch", sbatch)

    bridge.restart()
    bridge.time_passes(run)
    report = bridge.sync(run)
    assert report.failed == [], report.failed[0].last_error
    (row,) = report.submitted
    assert row.extra["chain"] == {"stage-in": "1", "compute": "2", "stage-out": "3"}


def test_a_cancelled_chain_run_leaves_no_token_behind(bridge: Bridge) -> None:
    run = bridge.start(EXPERIMENT, "4", chain=True)
    bridge.sync(run)
    chain = chain_of(bridge, run)
    assert token_file(bridge, run).exists()
    session = bridge.session
    (row,) = cancel_run(session.ledger, session.scheduler, bridge.ledger.run(run.id), session.store)
    assert row.state is JobState.CANCELLED
    qdels = [argv for argv in bridge.cluster.calls if argv[0] == "qdel"]
    assert qdels == [["qdel", chain["stage-in"], chain["compute"], chain["stage-out"]]]
    bridge.sync(run)  # the next pass, should the cancel not see to it itself
    assert not token_file(bridge, run).exists()  # "when the run ends" (docs/chains.md)
