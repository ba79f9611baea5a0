"""The batch schedulers' shared core (schedulers/batch.py) against a stateful fake cluster:
one poll for many jobs, ids the server forgot, arrays, cancels that fail for one id, and jobs
that end between polls."""

from __future__ import annotations

import pytest
from fakes import FakeCluster

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers.base import State
from hpcbridge.schedulers.pbs import PbsScheduler, SlurmPbsWrappers
from hpcbridge.schedulers.slurm import SlurmScheduler
from hpcbridge.transport import Result


def _qstats(cluster: FakeCluster) -> list[list[str]]:
    return [argv for argv in cluster.calls if argv[0] == "qstat"]


def test_one_poll_for_many_jobs_split_only_past_the_command_line_limit() -> None:
    cluster = FakeCluster()
    ids = [cluster.add("running", f"{n}.vm") for n in range(1000, 1700)]
    found = PbsScheduler(cluster, flavour="torque").status(ids)
    assert sorted(found) == sorted(ids)
    assert all(s.state is State.RUNNING for s in found.values())
    calls = _qstats(cluster)
    assert len(calls) == 2  # 700 ids of 7 characters: two command lines of at most 4000
    assert all(len(" ".join(argv[2:])) <= 4000 for argv in calls)
    assert [i for argv in calls for i in argv[2:]] == ids


def test_a_server_that_stops_at_an_unknown_id_is_asked_again_for_the_rest() -> None:
    cluster = FakeCluster(stop_at_unknown=True)
    first, last = cluster.add("running"), cluster.add("finished")
    cluster.add("running", "9.vm")
    cluster.set_state("9.vm", None)  # the server forgot it
    found = PbsScheduler(cluster, flavour="torque").status([first, "9.vm", last])
    assert {i: s.state for i, s in found.items()} == {
        first: State.RUNNING,
        last: State.FINISHED,
    }
    # the id the server named as unknown is not asked about again; the one after it is
    assert _qstats(cluster)[1:] == [["qstat", "-f", last]]


def test_a_single_job_on_pbs_pro_is_polled_as_json_and_its_exit_read() -> None:
    cluster = FakeCluster()
    job = cluster.add("walltime")
    status = PbsScheduler(cluster, flavour="pbspro").status([job])[job]
    assert (status.state, status.killed_by, status.limit) == (State.FAILED, "walltime", "00:00:05")
    assert _qstats(cluster) == [["qstat", "-f", "-F", "json", "-x", job]]


def test_a_failed_poll_raises_instead_of_reporting_jobs_gone() -> None:
    cluster = FakeCluster()
    job = cluster.add("running")
    cluster.fail_next["qstat"] = Result(("qstat",), 2, "", "cannot connect to server vm")
    scheduler = PbsScheduler(cluster, flavour="torque")
    with pytest.raises(SchedulerError, match="qstat failed: cannot connect to server vm"):
        scheduler.status([job])
    assert scheduler.status([job])[job].state is State.RUNNING  # the next poll sees it again


def test_a_job_that_finished_between_polls_reads_finished_then_absent() -> None:
    cluster = FakeCluster()
    job = cluster.add("running")
    scheduler = PbsScheduler(cluster, flavour="pbspro")
    assert scheduler.status([job])[job].state is State.RUNNING
    cluster.set_state(job, "finished")
    assert (scheduler.status([job])[job].state, scheduler.status([job])[job].exit_code) == (
        State.FINISHED,
        0,
    )
    cluster.set_state(job, None)  # out of the server's history
    assert scheduler.status([job]) == {}
    assert scheduler.status_calls == 4


def test_slurm_asks_each_job_alone_when_one_of_a_poll_has_left_squeue() -> None:
    cluster = FakeCluster(kind="slurm")
    gone, live = cluster.add("completed"), cluster.add("running")
    scheduler = SlurmScheduler(cluster)
    assert set(scheduler.status([gone, live])) == {gone, live}
    cluster.set_state(gone, None)  # MinJobAge ran out: squeue refuses the whole list
    found = scheduler.status([gone, live])
    assert {i: s.state for i, s in found.items()} == {live: State.RUNNING}
    assert scheduler.status_calls == 4  # the list, then each id alone


def test_an_array_is_as_lively_as_its_liveliest_task_and_fails_with_its_killed_one() -> None:
    cluster = FakeCluster(kind="slurm")
    cluster.tasks["77"] = {1: "completed", 2: "running", 3: "pending"}
    scheduler = SlurmScheduler(cluster)
    status = scheduler.status(["77"])["77"]
    assert (status.native_id, status.state) == ("77", State.RUNNING)
    cluster.tasks["77"] = {1: "completed", 2: "timeout", 3: "completed"}
    status = scheduler.status(["77"])["77"]
    assert (status.state, status.killed_by, status.limit) == (State.FAILED, "walltime", "20:00")


def test_a_cancel_the_server_refuses_for_one_id_cancels_the_others_one_by_one() -> None:
    cluster = FakeCluster()
    first, second = cluster.add("running"), cluster.add("held")
    unknown = PbsScheduler(cluster, flavour="pbspro").cancel([first, "9.vm", second])
    assert unknown == ["9.vm"]
    assert cluster.jobs == {first: "finished", second: "finished"}  # both deleted after all
    qdels = [argv[1:] for argv in cluster.calls if argv[0] == "qdel"]
    assert qdels == [[first, "9.vm", second], [first], ["9.vm"], [second]]


def test_cancelling_a_job_that_already_ended_is_not_an_error() -> None:
    cluster = FakeCluster()
    job = cluster.add("finished")
    assert PbsScheduler(cluster, flavour="pbspro").cancel([job]) == []


def test_a_cancel_that_fails_for_another_reason_raises() -> None:
    cluster = FakeCluster()
    job = cluster.add("running")
    cluster.fail_next["qdel"] = Result(("qdel",), 2, "", "qdel: cannot connect to server vm")
    with pytest.raises(SchedulerError, match="qdel failed: qdel: cannot connect to server vm"):
        PbsScheduler(cluster, flavour="pbspro").cancel([job])
    assert cluster.jobs[job] == "running"


def test_slurm_cancels_only_the_jobs_squeue_knows_and_reports_the_rest() -> None:
    cluster = FakeCluster(kind="slurm")
    job = cluster.add("running")
    assert SlurmScheduler(cluster).cancel([job, "999"]) == ["999"]
    assert ["scancel", job] in cluster.calls and cluster.jobs[job] == "completed"


def test_pbs_commands_that_are_slurm_wrappers_are_polled_through_squeue() -> None:
    cluster = FakeCluster(kind="slurm")
    scheduler = PbsScheduler(cluster)  # no flavour in the profile: asked of qstat --version
    job = scheduler.submit("/w/job.sh")
    assert isinstance(scheduler, SlurmPbsWrappers)
    assert [argv[0] for argv in cluster.calls] == ["qstat", "qsub"]
    assert scheduler.status([job])[job].state is State.QUEUED
    assert cluster.calls[-1][0] == "squeue"
