"""hpcbridge.schedulers.pbs: argv building and parsing of captured-looking qsub/qstat output."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hpcbridge.errors import SchedulerError
from hpcbridge.schedulers import State, chunk_ids
from hpcbridge.schedulers import pbs_commands as pbs

DATA = Path(__file__).parent / "data" / "sched"


def _read(name: str) -> str:
    return (DATA / name).read_text()


# --- flavour detection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "rc", "flavour"),
    [
        ("pbs_version = 2022.1.1\n", 0, "pbspro"),
        ("Version: 6.1.3\nCommit: 2dd0a6b2\n", 0, "torque"),
        ("Unknown option: version\nUsage: qstat [-f] [-a|-i|-r] ...\n", 2, "wrapper"),
        ("", 1, "wrapper"),
        ("usage: qstat [-f] job_id\n", 0, "wrapper"),
    ],
)
def test_detect_flavour(output: str, rc: int, flavour: str) -> None:
    assert pbs.detect_flavour(output, rc) == flavour


def test_detect_flavour_unrecognised_output() -> None:
    with pytest.raises(SchedulerError, match="cannot tell the PBS flavour"):
        pbs.detect_flavour("hello\n", 0)


# --- qsub -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"flavour": "pbspro"}, ["qsub", "/w/job.pbs"]),
        (
            {"flavour": "pbspro", "queue": "defaultQ", "project": "NEURO"},
            ["qsub", "-q", "defaultQ", "-P", "NEURO", "/w/job.pbs"],
        ),
        (
            {"flavour": "pbspro", "after": ["2238022.pbsserver", "2238023.pbsserver"]},
            ["qsub", "-W", "depend=afterok:2238022.pbsserver:2238023.pbsserver", "/w/job.pbs"],
        ),
        ({"flavour": "pbspro", "array": "1-10"}, ["qsub", "-J", "1-10", "/w/job.pbs"]),
        ({"flavour": "wrapper", "array": "1-10"}, ["qsub", "-J", "1-10", "/w/job.pbs"]),
        ({"flavour": "torque", "array": "1-10"}, ["qsub", "-t", "1-10", "/w/job.pbs"]),
        (
            {"flavour": "wrapper", "after": ["65"], "project": "NEURO"},
            ["qsub", "-P", "NEURO", "-W", "depend=afterok:65", "/w/job.pbs"],
        ),
        # Torque's -P is "run as this user": its project/accounting string is -A
        ({"flavour": "torque", "project": "NEURO"}, ["qsub", "-A", "NEURO", "/w/job.pbs"]),
        (
            {"flavour": "wrapper", "stdout": "/w/.hpcbridge/job.out", "stderr": "/w/e"},
            ["qsub", "-o", "/w/.hpcbridge/job.out", "-e", "/w/e", "/w/job.pbs"],
        ),
    ],
)
def test_submit_argv(kwargs: dict[str, object], expected: list[str]) -> None:
    argv = pbs.submit_argv("/w/job.pbs", **kwargs)  # type: ignore[arg-type]
    assert argv == expected
    assert all(isinstance(a, str) for a in argv)


def test_submit_argv_keeps_odd_paths_as_one_element() -> None:
    # No shell string is ever built: a path with a quote and a semicolon is one argv element.
    path = "/w/it's; rm -rf ~/job.pbs"
    argv = pbs.submit_argv(path, flavour="pbspro", project="NEURO")
    assert argv[-1] == path
    assert len(argv) == 4


def test_submit_argv_wrapper_refuses_spaces_in_path() -> None:
    with pytest.raises(SchedulerError, match="spaces"):
        pbs.submit_argv("/w/my job.pbs", flavour="wrapper")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"project": "-h"},
        {"project": "NEURO\n#PBS -l mem=1tb"},
        {"queue": "a b"},
        {"after": ["123; qdel all"]},
        {"after": ["-1"]},
        {"array": "1-10 -P x"},
    ],
)
def test_submit_argv_rejects_unsafe_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(SchedulerError, match="invalid|not PBS job ids"):
        pbs.submit_argv("/w/job.pbs", flavour="pbspro", **kwargs)  # type: ignore[arg-type]


def test_submit_argv_unknown_flavour() -> None:
    with pytest.raises(ValueError, match="flavour"):
        pbs.submit_argv("/w/job.pbs", flavour="lsf")


@pytest.mark.parametrize(
    ("stdout", "job_id"),
    [
        ("2238022.pbsserver\n", "2238022.pbsserver"),
        ("65\n", "65"),
        ("123[].pbsserver\n", "123[].pbsserver"),
        ("4417.torque-head.cluster.local\n", "4417.torque-head.cluster.local"),
        ("Warning: project NEURO is near its quota\n2238030.pbsserver\n", "2238030.pbsserver"),
    ],
)
def test_parse_submit(stdout: str, job_id: str) -> None:
    assert pbs.parse_submit(stdout) == job_id


@pytest.mark.parametrize(
    "stdout", ["", "qsub: Job rejected by all possible destinations\n", "sbatch: error: x"]
)
def test_parse_submit_garbage(stdout: str) -> None:
    with pytest.raises(SchedulerError, match="qsub printed no job id") as info:
        pbs.parse_submit(stdout)
    assert stdout.strip()[:20] in str(info.value)


# --- qstat / qdel argv ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavour", "json_output", "expected"),
    [
        ("pbspro", False, ["qstat", "-f", "-x", "1.s", "2.s"]),
        ("pbspro", True, ["qstat", "-f", "-F", "json", "-x", "1.s", "2.s"]),
        ("torque", False, ["qstat", "-f", "1.s", "2.s"]),
        ("wrapper", False, ["qstat", "-f", "1.s", "2.s"]),
    ],
)
def test_status_argv(flavour: str, json_output: bool, expected: list[str]) -> None:
    assert pbs.status_argv(["1.s", "2.s"], flavour=flavour, json_output=json_output) == expected


@pytest.mark.parametrize("flavour", ["torque", "wrapper"])
def test_status_argv_json_only_on_pbspro(flavour: str) -> None:
    with pytest.raises(SchedulerError, match="PBS Pro"):
        pbs.status_argv(["1"], flavour=flavour, json_output=True)


def test_status_and_cancel_need_ids() -> None:
    with pytest.raises(ValueError):
        pbs.status_argv([], flavour="pbspro")
    with pytest.raises(ValueError):
        pbs.cancel_argv([])


def test_cancel_argv() -> None:
    assert pbs.cancel_argv(["65", "123[].pbsserver"]) == ["qdel", "65", "123[].pbsserver"]


# --- chunking ---------------------------------------------------------------------------------


def test_chunk_ids_respects_limit() -> None:
    ids = [f"{n}.pbsserver" for n in range(2238000, 2238100)]
    chunks = list(chunk_ids(ids, max_chars=200))
    assert [i for chunk in chunks for i in chunk] == ids
    assert all(len(" ".join(chunk)) <= 200 for chunk in chunks)
    assert len(chunks) > 1


@pytest.mark.parametrize(
    ("ids", "max_chars", "expected"),
    [
        ([], 10, []),
        (["1", "2", "3"], 100, [["1", "2", "3"]]),
        (["12", "34", "56"], 5, [["12", "34"], ["56"]]),
        (["123456", "1"], 3, [["123456"], ["1"]]),
    ],
)
def test_chunk_ids_table(ids: list[str], max_chars: int, expected: list[list[str]]) -> None:
    assert list(chunk_ids(ids, max_chars=max_chars)) == expected


# --- qstat -f parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "job_id", "state", "raw", "exit_code", "name"),
    [
        ("pbspro_qstat_f.txt", "2238022.pbsserver", State.RUNNING, "R", None, "align_sub01"),
        ("pbspro_qstat_f.txt", "2238023.pbsserver", State.FINISHED, "F", 0, "convert_sub01"),
        ("pbspro_qstat_f.txt", "2238024.pbsserver", State.FAILED, "F", 271, "recon_sub02"),
        ("pbspro_qstat_f.txt", "2238025.pbsserver", State.HELD, "H", None, "qc_sub02"),
        # F with no Exit_status: finished, exit unknown; the job's own exit-code file decides.
        ("pbspro_qstat_f.txt", "2238026.pbsserver", State.FINISHED, "F", None, "stage_sub03"),
        ("pbspro_array.txt", "123[].pbsserver", State.RUNNING, "B", None, "dcm2niix_batch"),
        ("pbspro_array.txt", "123[7].pbsserver", State.FINISHED, "X", 0, "dcm2niix_batch"),
        ("pbspro_array.txt", "123[8].pbsserver", State.FAILED, "X", -1, "dcm2niix_batch"),
        ("pbspro_array.txt", "123[9].pbsserver", State.UNKNOWN, "Z", None, "dcm2niix_batch"),
        (
            "torque_qstat_f.txt",
            "4417.torque-head.cluster.local",
            State.FAILED,
            "C",
            3,
            "align_sub01",
        ),
        (
            "torque_qstat_f.txt",
            "4418.torque-head.cluster.local",
            State.QUEUED,
            "Q",
            None,
            "qc_sub01",
        ),
        ("wrapper_qstat_f.txt", "65", State.FINISHED, "C", None, "job.pbs"),
        ("wrapper_qstat_f.txt", "66", State.RUNNING, "R", None, "job.pbs"),
        ("wrapper_qstat_f.txt", "67", State.QUEUED, "Q", None, "job.pbs"),
        # captured from slurm-wlm-torque 22.05: attributes indented with a tab, not spaces
        ("wrapper_qstat_f_tabs.txt", "8", State.FINISHED, "C", None, "dcm2niix"),
    ],
)
def test_parse_qstat_full(
    fixture: str, job_id: str, state: State, raw: str, exit_code: int | None, name: str
) -> None:
    status = pbs.parse_qstat_full(_read(fixture))[job_id]
    assert (status.native_id, status.state, status.raw_state) == (job_id, state, raw)
    assert status.exit_code == exit_code
    assert status.name == name


def test_parse_qstat_full_job_sets() -> None:
    assert len(pbs.parse_qstat_full(_read("pbspro_qstat_f.txt"))) == 5
    assert len(pbs.parse_qstat_full(_read("pbspro_array.txt"))) == 4
    assert len(pbs.parse_qstat_full(_read("torque_qstat_f.txt"))) == 2
    assert set(pbs.parse_qstat_full(_read("wrapper_qstat_f.txt"))) == {"65", "66", "67"}
    assert pbs.parse_qstat_full("") == {}


def test_parse_qstat_full_joins_folded_lines() -> None:
    status = pbs.parse_qstat_full(_read("pbspro_qstat_f.txt"))["2238022.pbsserver"]
    assert status.reason == (
        "Job run at Sun Nov 22 at 09:58 on (hpc058:ncpus=4:mem=8388608kb) and "
        "exceeding its soft limit"
    )
    finished = pbs.parse_qstat_full(_read("pbspro_qstat_f.txt"))["2238023.pbsserver"]
    assert finished.reason.endswith("and finished")


def test_folded_variable_list_does_not_leak_keys() -> None:
    # "PBS_O_MAIL=/var/spool/mail/al\n\tice" must not become a key of its own.
    text = "Job Id: 1.s\n    Variable_List = A=1,B=al\n\tice = x,C=3\n    job_state = Q\n"
    status = pbs.parse_qstat_full(text)["1.s"]
    assert status.state is State.QUEUED


def test_exit_status_signal() -> None:
    status = pbs.parse_qstat_full(_read("pbspro_qstat_f.txt"))["2238024.pbsserver"]
    assert status.signal == 15  # 271 = 256 + SIGTERM (walltime exceeded / qdel)


@pytest.mark.parametrize("letter", sorted(pbs.STATE_MAP))
def test_every_known_letter(letter: str) -> None:
    # With an exit status of 0: an ended PBS Pro job without one never ran (tested below).
    text = f"Job Id: 1.s\n    job_state = {letter}\n    Exit_status = 0\n"
    assert pbs.parse_qstat_full(text)["1.s"].state is pbs.STATE_MAP[letter]


def test_unknown_letter_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hpcbridge.schedulers.pbs"):
        status = pbs.parse_qstat_full("Job Id: 9.s\n    job_state = M\n")["9.s"]
    assert status.state is State.UNKNOWN
    assert status.raw_state == "M"
    assert "unknown PBS job_state 'M'" in caplog.text


def test_missing_state_is_unknown() -> None:
    assert pbs.parse_qstat_full("Job Id: 9.s\n    queue = q\n")["9.s"].state is State.UNKNOWN


def test_non_numeric_exit_status_is_ignored() -> None:
    status = pbs.parse_qstat_full("Job Id: 9.s\n    job_state = F\n    Exit_status = ?\n")["9.s"]
    assert (status.state, status.exit_code) == (State.FINISHED, None)


def test_exit_status_does_not_override_live_state() -> None:
    # E (exiting) may already show an exit status; the job has not left the server yet.
    status = pbs.parse_qstat_full("Job Id: 9.s\n    job_state = E\n    Exit_status = 1\n")["9.s"]
    assert (status.state, status.exit_code) == (State.RUNNING, 1)


# --- qstat -F json ----------------------------------------------------------------------------


def test_parse_qstat_json() -> None:
    jobs = pbs.parse_qstat_json(_read("pbspro_qstat.json"))
    assert {k: v.state for k, v in jobs.items()} == {
        "2238022.pbsserver": State.RUNNING,
        "2238023.pbsserver": State.FINISHED,
        "2238024.pbsserver": State.FAILED,
        "2238027.pbsserver": State.QUEUED,
    }
    assert jobs["2238023.pbsserver"].exit_code == 0
    assert jobs["2238024.pbsserver"].exit_code == 271
    assert jobs["2238022.pbsserver"].name == "align_sub01"
    assert jobs["2238024.pbsserver"].reason.endswith("and failed")


def test_parse_qstat_json_agrees_with_text() -> None:
    from_json = pbs.parse_qstat_json(_read("pbspro_qstat.json"))
    from_text = pbs.parse_qstat_full(_read("pbspro_qstat_f.txt"))
    for job_id in ("2238023.pbsserver", "2238024.pbsserver"):
        assert from_json[job_id].state is from_text[job_id].state
        assert from_json[job_id].exit_code == from_text[job_id].exit_code


def test_parse_qstat_json_no_jobs() -> None:
    assert pbs.parse_qstat_json('{"timestamp": 1, "pbs_version": "2022.1.1"}') == {}


@pytest.mark.parametrize("text", ['{"Jobs": {"1.s": {', "qstat: illegal -F", ""])
def test_parse_qstat_json_invalid(text: str) -> None:
    with pytest.raises(SchedulerError, match="invalid JSON"):
        pbs.parse_qstat_json(text)


@pytest.mark.parametrize("text", ["[]", '{"Jobs": []}', '{"Jobs": {"1.s": 3}}'])
def test_parse_qstat_json_wrong_shape(text: str) -> None:
    with pytest.raises(SchedulerError, match="unexpected qstat JSON"):
        pbs.parse_qstat_json(text)


# --- unknown jobs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "rc", "unknown"),
    [
        ("qstat: Unknown Job Id Error 4417.torque-head.cluster.local\n", 153, True),  # Torque
        ("qstat: Unknown Job Id 2238022.pbsserver\n", 35, True),  # PBS Pro
        ("qdel: Unknown Job Id 2238022.pbsserver\n", 1, True),
        ("", 153, True),  # the Slurm wrapper: exit 153, no output
        ("", 1, False),  # wrapper qdel of an unknown id, but also any other failure
        ("qstat: cannot connect to server pbsserver (errno=111)\n", 2, False),
        ("qstat: Unknown Job Id 1.s\n", 0, False),
    ],
)
def test_unknown_job(stderr: str, rc: int, unknown: bool) -> None:
    assert pbs.unknown_job(stderr, rc) is unknown


def test_unknown_job_ids() -> None:
    stderr = "qstat: Unknown Job Id 1.s\nqstat: Unknown Job Id Error 2.torque\n"
    assert pbs.unknown_job_ids(stderr) == {"1.s", "2.torque"}


@pytest.mark.parametrize("path", ["job.out", "/w/logs/", "/w/my logs/job.out"])
def test_submit_argv_refuses_log_paths_the_wrappers_cannot_take(path: str) -> None:
    with pytest.raises(SchedulerError) as caught:
        pbs.submit_argv("/w/job.pbs", flavour="wrapper", stdout=path)
    assert str(caught.value) == (
        f"invalid stdout path for qsub: {path!r} (need an absolute file path)"
    )


# --- finding a job by name (before resubmitting after a crash) ---------------------------------


def test_find_argv_searches_pbs_pro_history_but_not_torques() -> None:
    assert pbs.find_argv("hb3_MR1_4", flavour="pbspro") == ["qselect", "-x", "-N", "hb3_MR1_4"]
    assert pbs.find_argv("hb3_MR1_4", flavour="torque") == ["qselect", "-N", "hb3_MR1_4"]


def test_find_argv_refuses_a_name_that_is_not_one_argument() -> None:
    with pytest.raises(SchedulerError, match="invalid job name"):
        pbs.find_argv("hb3 -u root", flavour="pbspro")


def test_parse_found_keeps_qselects_ids_in_order() -> None:
    out = "2238001.pbsserver\n2238007[].pbsserver\n\n"
    assert pbs.parse_found(out) == ["2238001.pbsserver", "2238007[].pbsserver"]
    assert pbs.parse_found("") == []
