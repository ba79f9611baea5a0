"""hpcbridge.schedulers.slurm: argv building and parsing of captured-looking Slurm output."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers import State
from hpcbridge.schedulers import slurm_commands as slurm
from hpcbridge.schedulers.base import explain_kill

DATA = Path(__file__).parent / "data" / "sched"


def _read(name: str) -> str:
    return (DATA / name).read_text()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["sbatch", "--parsable", "--export=ALL", "/w/job.sh"]),
        (
            {"partition": "batch", "account": "neuro-lab"},
            [
                "sbatch",
                "--parsable",
                "--export=ALL",
                "--partition=batch",
                "--account=neuro-lab",
                "/w/job.sh",
            ],
        ),
        (
            {"after": ["1", "2"]},
            ["sbatch", "--parsable", "--export=ALL", "--dependency=afterok:1:2", "/w/job.sh"],
        ),
        ({"array": "1-10"}, ["sbatch", "--parsable", "--export=ALL", "--array=1-10", "/w/job.sh"]),
        (
            {"array": "1-10%2"},
            ["sbatch", "--parsable", "--export=ALL", "--array=1-10%2", "/w/job.sh"],
        ),
    ],
)
def test_submit_argv(kwargs: dict[str, object], expected: list[str]) -> None:
    assert slurm.submit_argv("/w/job.sh", **kwargs) == expected  # type: ignore[arg-type]


def test_submit_argv_path_is_one_element() -> None:
    path = "/w/my job's $(dir)/job.sh"
    argv = slurm.submit_argv(path, partition="batch")
    assert argv == ["sbatch", "--parsable", "--export=ALL", "--partition=batch", path]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partition": "batch --uid=0"},
        {"account": "-x"},
        {"after": ["1;scancel -u alice"]},
        {"array": "1-10\n#SBATCH --mem=1T"},
    ],
)
def test_submit_argv_rejects_unsafe_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(SchedulerError):
        slurm.submit_argv("/w/job.sh", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stdout", "job_id"),
    [("123\n", "123"), ("123;ci\n", "123"), ("note: x\n4101\n", "4101"), ("  77  ", "77")],
)
def test_parse_submit(stdout: str, job_id: str) -> None:
    assert slurm.parse_submit(stdout) == job_id


@pytest.mark.parametrize(
    "stdout", ["", "sbatch: error: Batch job submission failed: Invalid account\n", "abc;ci"]
)
def test_parse_submit_garbage(stdout: str) -> None:
    with pytest.raises(SchedulerError, match="sbatch printed no job id"):
        slurm.parse_submit(stdout)


def test_status_argv_format_is_one_argument() -> None:
    argv = slurm.status_argv(["1", "2", "3_4"])
    assert argv == ["squeue", "-h", "-t", "all", "-j", "1,2,3_4", "-o", "%i|%T|%r|%l|%m|%j"]


def test_status_and_cancel_argv_validate() -> None:
    with pytest.raises(ValueError):
        slurm.status_argv([])
    with pytest.raises(ValueError):
        slurm.cancel_argv([])
    with pytest.raises(SchedulerError, match="not Slurm job ids"):
        slurm.status_argv(["1,2"])
    assert slurm.cancel_argv(["4101", "4120_4"]) == ["scancel", "4101", "4120_4"]


@pytest.mark.parametrize(
    ("job_id", "state", "reason", "name"),
    [
        ("4101", State.QUEUED, "Priority", "align_sub01"),
        ("4102", State.QUEUED, "DependencyNeverSatisfied", "convert_sub01"),
        ("4103", State.RUNNING, "", "recon sub02"),
        ("4104", State.RUNNING, "", "qc_sub02"),
        ("4105", State.FINISHED, "", "stage_sub03"),
        ("4106", State.FAILED, "NonZeroExitCode", "align_sub04"),
        ("4107", State.FAILED, "TimeLimit", "align_sub05"),
        ("4108", State.FAILED, "OutOfMemory", "align_sub06"),
        ("4109", State.FAILED, "NodeDown", "align_sub07"),
        ("4110", State.FAILED, "", "align_sub08"),
        ("4111", State.FAILED, "DeadLine", "align_sub09"),
        ("4112", State.CANCELLED, "", "align_sub10"),
        ("4113", State.HELD, "", "align_sub11"),
        ("4114", State.QUEUED, "", "align_sub12"),
        ("4115", State.HELD, "JobHeldAdmin", "align_sub13"),
        ("4116", State.FAILED, "", "align_sub14"),
        ("4120_4", State.RUNNING, "", "dcm2niix_batch"),
        ("4120_[5-10%2]", State.QUEUED, "JobArrayTaskLimit", "dcm2niix_batch"),
        ("4121", State.UNKNOWN, "", "odd"),
        ("4122", State.RUNNING, "", "name|with|pipes"),
    ],
)
def test_parse_squeue(job_id: str, state: State, reason: str, name: str) -> None:
    status = slurm.parse_squeue(_read("squeue.txt"))[job_id]
    assert (status.native_id, status.state, status.reason, status.name) == (
        job_id,
        state,
        reason,
        name,
    )
    assert status.exit_code is None


def test_parse_squeue_counts_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hpcbridge.schedulers.slurm"):
        jobs = slurm.parse_squeue(_read("squeue.txt") + "\ngarbage\n")
    assert len(jobs) == 20
    assert "unknown Slurm state 'WIBBLING'" in caplog.text
    assert "garbage" in caplog.text
    assert jobs["4121"].raw_state == "WIBBLING"
    assert slurm.parse_squeue("") == {}


@pytest.mark.parametrize(
    ("job_id", "killed_by", "limit"),
    [
        ("4107", "walltime", "20:00"),  # TIMEOUT: the time limit it ran into
        ("4108", "memory", "4000M"),  # OUT_OF_MEMORY: the memory it asked for
        ("4106", None, None),  # FAILED by its own exit code: Slurm killed nothing
        ("4112", None, None),
    ],
)
def test_parse_squeue_says_which_limit_killed_the_job(
    job_id: str, killed_by: str | None, limit: str | None
) -> None:
    status = slurm.parse_squeue(_read("squeue.txt"))[job_id]
    assert (status.killed_by, status.limit) == (killed_by, limit)


def test_parse_squeue_explains_a_timeout() -> None:
    status = slurm.parse_squeue(_read("squeue.txt"))["4107"]
    assert explain_kill(status) == (
        "killed: walltime 20:00 exceeded; raise walltime in the recipe's [resources] "
        "or the job script's directives"
    )


def test_parse_squeue_unlimited_time_is_no_limit() -> None:
    status = slurm.parse_squeue("9|TIMEOUT|TimeLimit|UNLIMITED|0|x\n")["9"]
    assert (status.killed_by, status.limit) == ("walltime", None)
    assert explain_kill(status).startswith("killed: walltime exceeded; ")


@pytest.mark.parametrize(
    ("stderr", "rc", "unknown"),
    [
        ("slurm_load_jobs error: Invalid job id specified\n", 1, True),
        ("scancel: error: Kill job error on job id 9: Invalid job id specified\n", 1, True),
        ("slurm_load_jobs error: Unable to contact slurm controller\n", 1, False),
        ("", 0, False),
    ],
)
def test_unknown_job(stderr: str, rc: int, unknown: bool) -> None:
    assert slurm.unknown_job(stderr, rc) is unknown


# --- finding a job by name (before resubmitting after a crash) ---------------------------------


def test_find_argv_includes_ended_jobs() -> None:
    assert slurm.find_argv("hb3_MR1_4") == [
        "squeue", "-h", "-t", "all", "-n", "hb3_MR1_4", "-o", "%i"
    ]  # fmt: skip


def test_find_argv_refuses_a_name_that_is_not_one_argument() -> None:
    with pytest.raises(SchedulerError, match="invalid job name"):
        slurm.find_argv("a,b")


def test_parse_found_folds_array_tasks_into_their_job_and_sorts() -> None:
    assert slurm.parse_found("812\n799_1\n799_2\n799_[3-5]\n") == ["799", "812"]
    assert slurm.parse_found("") == []


def test_a_timeout_wins_over_the_143_the_jobs_trap_recorded() -> None:
    from hpcbridge.jobs import Job
    from hpcbridge.schedulers.outcome import resolve as _resolve
    from hpcbridge.transport import LocalTransport

    class Files(LocalTransport):
        def read_text(self, path: str, *, limit: int = 0) -> str | None:
            return '{"exit_code": 143, "end": "x"}' if path.endswith("/status.json") else None

    status = slurm.parse_squeue(_read("squeue.txt"))["4107"]
    job = Job("4107", "slurm", "", "/w/.hpcbridge/job.sh", "/w", "a", "t", state="running")
    done = _resolve(job, status, Files())
    assert (done.state, done.exit_code) == ("failed", 143)
    assert done.reason == explain_kill(status)
    assert done.reason.startswith("killed: walltime 20:00 exceeded; raise walltime")
