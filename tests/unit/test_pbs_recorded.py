"""hpcbridge.schedulers.pbs against what a real OpenPBS server printed, and variants of it.

``data/openpbs/`` holds qsub/qstat/qdel output recorded from OpenPBS 23.06.06 (see its
README): every recorded output is parsed here, and the variants other versions and sites
print (folded or not, tab or space indentation, odd JSON layout, ids with or without the
server suffix) are made from the recorded ones, so each differs from real output in one way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hpcbridge.errors import SchedulerError
from hpcbridge.jobs import Job
from hpcbridge.schedulers import State, pbs, pbs_commands
from hpcbridge.schedulers.base import JobStatus, explain_kill
from hpcbridge.schedulers.outcome import STATUS_FILE_GRACE
from hpcbridge.schedulers.outcome import resolve as _resolve
from hpcbridge.schedulers.outcome import resolve_by_scheduler as _resolve_by_scheduler
from hpcbridge.transport import Result, Transport

DATA = Path(__file__).parent / "data" / "openpbs"

WALLTIME_HINT = "raise walltime in the recipe's [resources] or the job script's directives"
WALLTIME_KILL = f"killed: walltime 00:00:05 exceeded; {WALLTIME_HINT}"


@dataclass(frozen=True)
class Record:
    """One recorded command: ``NN_name.txt`` parsed."""

    name: str
    command: str
    stdout: str
    stderr: str
    exit_code: int


def _load(name: str) -> Record:
    text = (DATA / f"{name}.txt").read_text()
    command = re.search(r"^\$ (.*)$", text, re.MULTILINE)
    code = re.search(r"^----- exit code: (-?\d+) -----$", text, re.MULTILINE)
    assert command and code, f"{name}.txt is not a recorded command"
    body = text[text.index("\n-----", command.end()) + 1 : code.start()]
    if body.startswith("----- stdout+stderr -----\n"):
        # recorded with both streams together (the qsub-as-root records)
        out, err = body.removeprefix("----- stdout+stderr -----\n"), ""
    else:
        out, err = body.removeprefix("----- stdout -----\n").split("----- stderr -----\n")
    return Record(name, command.group(1), out, err, int(code.group(1)))


RECORDS = sorted(p.stem for p in DATA.glob("[0-9][0-9]_*.txt"))
QSTATS = [n for n in RECORDS if re.match(r"qstat (-x )?-f", _load(n).command)]


def _parse(record: Record) -> dict[str, JobStatus]:
    """What hpcbridge makes of a recorded qstat, by the format it asked for."""
    if "-F json" in record.command:
        return pbs_commands.parse_qstat_json(record.stdout)
    return pbs_commands.parse_qstat_full(record.stdout)


def test_every_record_is_here_and_readable() -> None:
    # 38 commands were recorded; a lost file must not silently shrink the tests.
    assert len(RECORDS) == 38
    for name in RECORDS:
        record = _load(name)
        raw = DATA / f"{name}.stdout"
        if raw.exists():
            assert raw.read_text() == record.stdout, name


# --- every recorded qstat ------------------------------------------------------------------

# record -> (job id, state, job_state letter, exit code); None: no job in the output.
EXPECTED: dict[str, tuple[str, State, str, int | None] | None] = {
    "02_qstat_f_json_just_submitted": ("0.vm", State.RUNNING, "R", None),
    "03_qstat_f_json_running": ("0.vm", State.RUNNING, "R", None),
    "04_qstat_f_text_running": ("0.vm", State.RUNNING, "R", None),
    "05_qstat_x_f_json_finished_ok": ("0.vm", State.FINISHED, "F", 0),  # substate 92
    "06_qstat_x_f_text_finished_ok": ("0.vm", State.FINISHED, "F", 0),
    "12_qstat_f_json_wallkill_running": ("2.vm", State.RUNNING, "R", None),
    "13_qstat_x_f_json_exit3": ("1.vm", State.FAILED, "F", 3),  # substate 93
    "14_qstat_x_f_json_walltime_killed": ("2.vm", State.FAILED, "F", -29),
    "15_qstat_x_f_text_walltime_killed": ("2.vm", State.FAILED, "F", -29),
    "21_qstat_f_json_longrun_running": ("3.vm", State.RUNNING, "R", None),
    # qdel'd a moment ago: still R, though the comment already says "terminated by"
    "23_qstat_f_json_right_after_qdel": ("3.vm", State.RUNNING, "R", None),
    # substate 91: deleted while running, Exit_status 271 = 256 + SIGTERM
    "24_qstat_x_f_json_after_qdel": ("3.vm", State.CANCELLED, "F", 271),
    "25_qstat_f_json_finished_without_x": None,
    "28_qstat_f_json_unknown_id": None,
    "29_qstat_x_f_json_unknown_id": None,
    "32_qstat_f_unknown_text": None,
    "44_qstat_f_json_child_held_waiting": ("5.vm", State.HELD, "H", None),  # substate 22
    "45_qstat_f_text_child_held": ("7.vm", State.HELD, "H", None),
    "46_qstat_x_f_json_parentok": ("4.vm", State.FINISHED, "F", 0),
    "47_qstat_x_f_json_child_of_ok": ("5.vm", State.FINISHED, "F", 0),
    "48_qstat_x_f_json_parentfail": ("6.vm", State.FAILED, "F", 3),
    # deleted by the server because its afterok parent failed: F, substate 92, no
    # Exit_status, no comment. It never ran, so it is not "finished".
    "49_qstat_x_f_json_child_of_fail": ("7.vm", State.CANCELLED, "F", None),
    "50_qstat_f_json_child_of_fail_no_x": None,
}


def test_every_recorded_qstat_has_an_expectation() -> None:
    assert sorted(EXPECTED) == QSTATS


@pytest.mark.parametrize("name", QSTATS)
def test_recorded_qstat(name: str) -> None:
    parsed = _parse(_load(name))
    expected = EXPECTED[name]
    if expected is None:
        assert parsed == {}
        return
    job_id, state, raw, exit_code = expected
    assert list(parsed) == [job_id]
    status = parsed[job_id]
    assert (status.native_id, status.state, status.raw_state, status.exit_code) == expected
    # the name as the output spells it, in either format
    spelled = re.search(r'Job_Name"?:?\s*=?\s*"?(\w+)', _load(name).stdout)
    assert spelled and status.name == spelled.group(1)


@pytest.mark.parametrize(
    ("json_name", "text_name"),
    [
        ("03_qstat_f_json_running", "04_qstat_f_text_running"),
        ("05_qstat_x_f_json_finished_ok", "06_qstat_x_f_text_finished_ok"),
        ("14_qstat_x_f_json_walltime_killed", "15_qstat_x_f_text_walltime_killed"),
    ],
)
def test_json_and_text_of_the_same_job_agree(json_name: str, text_name: str) -> None:
    from_json = _parse(_load(json_name))
    from_text = _parse(_load(text_name))
    assert from_json == from_text


def test_recorded_names_and_folded_comment() -> None:
    status = _parse(_load("06_qstat_x_f_text_finished_ok"))["0.vm"]
    assert status.name == "okjob"
    # folded after "and " onto a tab-indented line: joined with exactly one space
    assert status.reason == (
        "Job run at Mon Dec 07 at 16:44 on (vm:ncpus=1:mem=1048576kb) and finished"
    )


# --- why a job ended ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["14_qstat_x_f_json_walltime_killed", "15_qstat_x_f_text_walltime_killed"]
)
def test_recorded_walltime_kill_names_the_walltime_and_its_limit(name: str) -> None:
    status = _parse(_load(name))["2.vm"]
    assert (status.killed_by, status.limit, status.signal) == ("walltime", "00:00:05", None)
    assert explain_kill(status) == WALLTIME_KILL
    assert status.reason.endswith("and exceeded resource walltime")


def test_recorded_script_failure_is_no_kill() -> None:
    status = _parse(_load("13_qstat_x_f_json_exit3"))["1.vm"]
    assert (status.killed_by, status.limit, status.signal) == (None, None, None)
    assert explain_kill(status) == ""


def test_recorded_qdel_of_a_running_job() -> None:
    status = _parse(_load("24_qstat_x_f_json_after_qdel"))["3.vm"]
    assert (status.killed_by, status.signal) == ("signal", 15)
    assert status.reason == "deleted by pbsuser@localhost"
    assert explain_kill(status) == "killed by signal 15 (SIGTERM)"


def test_recorded_job_that_never_ran() -> None:
    status = _parse(_load("49_qstat_x_f_json_child_of_fail"))["7.vm"]
    assert status.reason == pbs_commands.NEVER_RAN
    assert explain_kill(status) == ""


@pytest.mark.parametrize(
    ("code", "killed_by", "limit_key", "limit", "sentence"),
    [
        (-27, "memory", "mem", "1gb", "killed: memory 1gb exceeded; raise memory"),
        (-26, "vmem", "vmem", "2gb", "killed: virtual memory (vmem) 2gb exceeded; raise memory"),
        (-28, "cput", "cput", "01:00:00", "killed: CPU time (cput) 01:00:00 exceeded; use a"),
        (-24, "ncpus", "ncpus", "1", "killed: CPU use (ncpus) 1 exceeded; raise cpus"),
        (-25, "ncpus", "ncpus", "1", "killed: CPU use (ncpus) 1 exceeded; raise cpus"),
        (-29, "walltime", "walltime", "00:00:05", WALLTIME_KILL),
    ],
)
def test_every_pbspro_resource_kill(
    code: int, killed_by: str, limit_key: str, limit: str, sentence: str
) -> None:
    doc = json.loads(_load("14_qstat_x_f_json_walltime_killed").stdout)
    job = doc["Jobs"]["2.vm"]
    job["Exit_status"] = code
    job["comment"] = "Job run at Mon Dec 07 at 16:45 on (vm:ncpus=1:mem=1048576kb) and failed"
    job["Resource_List"][limit_key] = limit if limit_key != "ncpus" else int(limit)
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["2.vm"]
    assert (status.state, status.killed_by, status.limit) == (State.FAILED, killed_by, limit)
    assert explain_kill(status).startswith(sentence)


def test_a_kill_without_the_limit_on_record_still_names_the_resource() -> None:
    text = _load("15_qstat_x_f_text_walltime_killed").stdout
    text = text.replace("    Resource_List.walltime = 00:00:05\n", "")
    status = pbs_commands.parse_qstat_full(text)["2.vm"]
    assert explain_kill(status) == f"killed: walltime exceeded; {WALLTIME_HINT}"


def test_the_comment_names_the_kill_where_the_exit_status_is_a_signal() -> None:
    # Older PBS reported a resource kill as 256 + SIGKILL/SIGTERM; the comment still says which.
    text = _load("15_qstat_x_f_text_walltime_killed").stdout.replace("= -29", "= 271")
    status = pbs_commands.parse_qstat_full(text)["2.vm"]
    assert (status.killed_by, status.limit, status.signal) == ("walltime", "00:00:05", 15)
    assert explain_kill(status) == WALLTIME_KILL


@pytest.mark.parametrize(
    ("code", "start"),
    [
        (-1, "the server could not run the job (execution failed before its files"),
        (-10, "the job's user or group is not valid on the execution node"),
        (-20, "the job lost contact with its first node"),
        (-99, "PBS Pro could not run the job (PBS exit status -99)"),
    ],
)
def test_other_negative_exit_statuses_say_what_they_mean(code: int, start: str) -> None:
    text = _load("15_qstat_x_f_text_walltime_killed").stdout
    text = text.replace("= -29", f"= {code}").replace("exceeded resource walltime", "failed")
    status = pbs_commands.parse_qstat_full(text)["2.vm"]
    assert (status.state, status.exit_code, status.killed_by) == (State.FAILED, code, None)
    assert status.reason.startswith(start)
    assert f"(PBS exit status {code})" in status.reason
    assert status.reason.endswith("and failed")  # the server's comment is kept


def test_torque_negative_codes_are_not_read_as_pbs_pro_ones() -> None:
    # Torque spells it exit_status, and its JOB_EXEC_* numbers mean other things.
    text = "Job Id: 9.torque\n    job_state = C\n    exit_status = -29\n"
    status = pbs_commands.parse_qstat_full(text)["9.torque"]
    assert (status.state, status.killed_by) == (State.FAILED, None)
    assert status.reason == "the PBS server could not run the job (PBS exit status -29)"


def test_torque_signal_exit() -> None:
    status = pbs_commands.parse_qstat_full(
        "Job Id: 9.t\n    job_state = C\n    exit_status = 265\n"
    )["9.t"]
    assert (status.state, status.signal) == (State.FAILED, 9)
    assert explain_kill(status) == "killed by signal 9 (SIGKILL)"


def test_a_job_deleted_while_queued_is_cancelled() -> None:
    # Deleted before it ran: F, substate 91, no Exit_status.
    doc = json.loads(_load("49_qstat_x_f_json_child_of_fail").stdout)
    doc["Jobs"]["7.vm"]["substate"] = 91
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["7.vm"]
    assert (status.state, status.exit_code) == (State.CANCELLED, None)


def test_an_ended_array_parent_without_exit_status_is_not_called_cancelled() -> None:
    # The parent never runs itself, so "no Exit_status" says nothing about its subjobs.
    doc = json.loads(_load("49_qstat_x_f_json_child_of_fail").stdout)
    doc["Jobs"] = {"8[].vm": doc["Jobs"]["7.vm"]}
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["8[].vm"]
    assert (status.state, status.exit_code) == (State.FINISHED, None)


def test_a_job_moved_to_another_server_is_not_ended() -> None:
    doc = json.loads(_load("49_qstat_x_f_json_child_of_fail").stdout)
    doc["Jobs"]["7.vm"].update(substate=94, comment="Job moved to server other")
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["7.vm"]
    assert (status.state, status.reason) == (State.UNKNOWN, "Job moved to server other")


def test_a_job_that_ran_and_shows_no_exit_status_is_left_to_its_status_file() -> None:
    # Not seen on a real server, but a job that ran is not "cancelled" for lack of a number.
    doc = json.loads(_load("05_qstat_x_f_json_finished_ok").stdout)
    del doc["Jobs"]["0.vm"]["Exit_status"]
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["0.vm"]
    assert (status.state, status.exit_code) == (State.FINISHED, None)


def test_qdel_of_a_running_job_on_a_version_without_substates() -> None:
    doc = json.loads(_load("24_qstat_x_f_json_after_qdel").stdout)
    del doc["Jobs"]["3.vm"]["substate"]
    status = pbs_commands.parse_qstat_json(json.dumps(doc))["3.vm"]
    assert (status.state, status.reason) == (State.CANCELLED, "deleted by pbsuser@localhost")


# --- text variants --------------------------------------------------------------------------


def _wallkill_text() -> str:
    return _load("15_qstat_x_f_text_walltime_killed").stdout


def _walltime_killed(text: str, job_id: str = "2.vm") -> JobStatus:
    status = pbs_commands.parse_qstat_full(text)[job_id]
    assert (status.state, status.exit_code, status.name) == (State.FAILED, -29, "wallkill")
    assert (status.killed_by, status.limit) == ("walltime", "00:00:05")
    assert status.reason == (
        "Job run at Mon Dec 07 at 16:45 on (vm:ncpus=1:mem=1048576kb) and "
        "exceeded resource walltime"
    )
    return status


def test_unfolded_text() -> None:
    # `qstat -f -w` and some versions print every value on one line.
    _walltime_killed(_wallkill_text().replace("\n\t", ""))


def test_continuation_lines_indented_with_spaces() -> None:
    # The fold's tab replaced by spaces; the value's own space stays before the fold.
    text = _wallkill_text().replace("\n\t", "\n        ")
    assert "and \n        exceeded" in text
    _walltime_killed(text)


def test_attributes_indented_with_tabs() -> None:
    # The Slurm wrappers indent attributes with a tab, PBS's folding character.
    text = re.sub(r"^    ", "\t", _wallkill_text(), flags=re.MULTILINE)
    _walltime_killed(text)


def test_crlf_line_ends() -> None:
    _walltime_killed(_wallkill_text().replace("\n", "\r\n"))


def test_a_folded_piece_that_looks_like_an_attribute_stays_in_its_value() -> None:
    # A Variable_List value folded just before "Job_Name = ..." text of its own: with space-
    # indented attributes, a tab-indented line is a fold, never an attribute.
    text = _wallkill_text().replace(
        "\tPBS_O_SYSTEM=Linux,", "\tJob_Name = evil,Exit_status = 0,PBS_O_SYSTEM=Linux,"
    )
    _walltime_killed(text)


def test_values_with_equals_signs_and_non_ascii_text() -> None:
    text = (
        _wallkill_text()
        .replace(
            "    Job_Name = wallkill\n",
            "    Job_Name = wallkill\n    Account_Name = a = b, c=d\n",
        )
        .replace("exceeded resource walltime", "exceeded resource walltime — données = 5 µs")
    )
    status = pbs_commands.parse_qstat_full(text)["2.vm"]
    assert status.reason.endswith("exceeded resource walltime — données = 5 µs")
    assert (status.killed_by, status.name) == ("walltime", "wallkill")


def test_attributes_only_some_versions_print_are_ignored() -> None:
    text = _wallkill_text().replace(
        "    job_state = F\n",
        "    job_state = F\n    estimated.start_time = Mon Dec  7 16:45:18 2026\n"
        "    Resource_List.ngpus = 0\n    eligible_time = 00:00:00\n",
    )
    _walltime_killed(text)


def test_a_value_missing_its_equals_sign_is_skipped() -> None:
    text = _wallkill_text().replace("    queue = workq\n", "    queue workq\n")
    _walltime_killed(text)


def test_several_jobs_in_one_text() -> None:
    text = _load("06_qstat_x_f_text_finished_ok").stdout + _wallkill_text()
    parsed = pbs_commands.parse_qstat_full(text)
    assert {k: v.state for k, v in parsed.items()} == {
        "0.vm": State.FINISHED,
        "2.vm": State.FAILED,
    }
    _walltime_killed(text)


# --- JSON variants ---------------------------------------------------------------------------


def _wallkill_json() -> str:
    return _load("14_qstat_x_f_json_walltime_killed").stdout


@pytest.mark.parametrize(
    "layout",
    [
        {"indent": None},
        {"indent": 1},
        {"indent": "   \t"},
        {"indent": None, "separators": (",", ":")},
        {"indent": 2, "ensure_ascii": False},
    ],
)
def test_json_in_any_layout(layout: dict[str, object]) -> None:
    text = json.dumps(json.loads(_wallkill_json()), **layout)  # type: ignore[arg-type]
    assert pbs_commands.parse_qstat_json(text) == pbs_commands.parse_qstat_json(_wallkill_json())
    _walltime_killed(_wallkill_text())  # and both agree with the text


def test_json_with_non_ascii_comment() -> None:
    doc = json.loads(_wallkill_json())
    doc["Jobs"]["2.vm"]["comment"] += " — réessayer"
    for ascii_only in (True, False):
        text = json.dumps(doc, ensure_ascii=ascii_only)
        status = pbs_commands.parse_qstat_json(text)["2.vm"]
        assert status.reason.endswith("exceeded resource walltime — réessayer")
        assert status.killed_by == "walltime"


def test_json_that_pbs_broke_is_an_error_the_poll_recovers_from() -> None:
    # Some releases print a Variable_List value with a raw control character or quote.
    broken = _wallkill_json().replace('"PBS_O_SHELL":\t"/bin/bash"', '"PBS_O_SHELL":\t"/bin/"sh"')
    with pytest.raises(SchedulerError, match="invalid JSON"):
        pbs_commands.parse_qstat_json(broken)


# --- the scheduler over recorded output ------------------------------------------------------


class Replay(Transport):
    """Answers qsub/qstat/qdel with recorded results: ``answers`` maps a whole command line, or
    an argv's last element (the job id or script), to a Result; anything else fails the test."""

    def __init__(self, answers: dict[str, tuple[str, str, int]]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        stdin: str | None = None,
        retry: bool = True,
    ) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        whole = " ".join(argv)
        if whole in self.answers:  # a whole command line, where the last word is ambiguous
            out, err, code = self.answers[whole]
            return Result(tuple(argv), code, out, err)
        if argv[0] == "env":  # qsub runs behind `env -u SECRET ...`
            argv = argv[argv.index("qsub") :]
        key = " ".join(argv[argv.index("qstat") + 1 :]) if "qstat" in argv else argv[-1]
        if argv[0] == "qstat" and argv[1] == "--version":
            key = "--version"
        assert key in self.answers, f"unexpected command {argv}"
        out, err, code = self.answers[key]
        return Result(tuple(argv), code, out, err)

    def write_text(self, path: str, text: str, *, mode: int = 0o644) -> None:
        raise AssertionError("no file is written")

    def read_text(self, path: str, *, limit: int = 0) -> str | None:
        raise AssertionError("no file is read")

    def put(self, local: Path, path: str, *, mode: int | None = None) -> None:
        raise AssertionError("no file is copied")

    def get(self, path: str, local: Path) -> None:
        raise AssertionError("no file is copied")

    def makedirs(self, path: str) -> None:
        raise AssertionError("no folder is made")

    def files_in(self, folder: str) -> list[str]:
        raise AssertionError("no folder is listed")

    def remove(self, path: str) -> None:
        raise AssertionError("no file is removed")


def _answer(name: str) -> tuple[str, str, int]:
    record = _load(name)
    return record.stdout, record.stderr, record.exit_code


def _poll_argv(ids: str) -> str:
    return f"-f -F json -x {ids}"


@pytest.mark.parametrize("name", ["30_qstat_version", "31_qsub_version"])
def test_recorded_version_is_pbs_pro(name: str) -> None:
    record = _load(name)
    assert pbs_commands.detect_flavour(record.stdout + record.stderr, record.exit_code) == "pbspro"


def test_flavour_is_asked_of_qstat_version_once() -> None:
    transport = Replay({"--version": _answer("30_qstat_version")})
    scheduler = pbs.PbsScheduler(transport)
    assert (scheduler.flavour, scheduler.flavour, scheduler.template) == ("pbspro",) * 2 + ("pbs",)
    assert transport.calls == [["qstat", "--version"]]


@pytest.mark.parametrize(
    ("name", "job_id"),
    [
        ("01_qsub_ok", "0.vm"),
        ("10_qsub_fail3", "1.vm"),
        ("11_qsub_wallkill", "2.vm"),
        ("20_qsub_longrun", "3.vm"),
        ("40_qsub_parentok", "4.vm"),
        ("41_qsub_child_afterok_parentok", "5.vm"),
        ("42_qsub_parentfail", "6.vm"),
        ("43_qsub_child_afterok_parentfail", "7.vm"),
        ("71_qsub_as_root_acl_roots", "10.vm"),
    ],
)
def test_recorded_qsub_ids(name: str, job_id: str) -> None:
    record = _load(name)
    assert record.exit_code == 0
    assert pbs_commands.parse_submit(record.stdout) == job_id
    transport = Replay({"/w/job.sh": _answer(name)})
    assert pbs.PbsScheduler(transport, flavour="pbspro").submit("/w/job.sh") == job_id


def test_recorded_qsub_refusal_is_a_scheduler_error() -> None:
    transport = Replay({"/w/job.sh": _answer("70_qsub_as_root_default")})
    with pytest.raises(SchedulerError, match="qsub refused the job: qsub: Bad UID"):
        pbs.PbsScheduler(transport, flavour="pbspro").submit("/w/job.sh")


@pytest.mark.parametrize("job_id", ["8[].vm", "8[]", "8[1].vm"])
def test_array_ids_are_pbs_ids(job_id: str) -> None:
    assert pbs_commands.parse_submit(f"{job_id}\n") == job_id
    assert pbs_commands.status_argv([job_id], flavour="pbspro")[-1] == job_id


@pytest.mark.parametrize("asked", ["2.vm", "2"])
def test_status_of_the_walltime_killed_job(asked: str) -> None:
    # The server prints "2.vm" whether it was asked "2.vm" or "2".
    transport = Replay({_poll_argv(asked): _answer("14_qstat_x_f_json_walltime_killed")})
    scheduler = pbs.PbsScheduler(transport, flavour="pbspro")
    found = scheduler.status([asked])
    assert list(found) == [asked]
    assert explain_kill(found[asked]) == WALLTIME_KILL
    assert scheduler.status_calls == 1


def test_server_printing_no_suffix_for_an_id_asked_with_one() -> None:
    text = _wallkill_text().replace("Job Id: 2.vm", "Job Id: 2")
    transport = Replay({"-f 2.vm": (text, "", 0)})
    found = pbs.PbsScheduler(transport, flavour="torque").status(["2.vm"])
    assert found["2.vm"].killed_by == "walltime"


@pytest.mark.parametrize("name", ["28_qstat_f_json_unknown_id", "29_qstat_x_f_json_unknown_id"])
def test_recorded_unknown_id_is_absent_not_an_error(name: str) -> None:
    # exit 153, and the JSON header on stdout even so
    record = _load(name)
    assert (record.exit_code, record.stdout.startswith("{")) == (153, True)
    assert pbs_commands.unknown_job(record.stderr, record.exit_code)
    assert pbs_commands.unknown_job_ids(record.stderr) == {"9999.vm"}
    transport = Replay({_poll_argv("9999.vm"): _answer(name)})
    assert pbs.PbsScheduler(transport, flavour="pbspro").status(["9999.vm"]) == {}


def test_recorded_unknown_id_in_text() -> None:
    record = _load("32_qstat_f_unknown_text")
    assert (record.stdout, record.exit_code) == ("", 153)
    transport = Replay({"-f 9999.vm": _answer("32_qstat_f_unknown_text")})
    assert pbs.PbsScheduler(transport, flavour="torque").status(["9999.vm"]) == {}


@pytest.mark.parametrize("ids", [["2.vm", "9999.vm"], ["2", "9999"]])
def test_one_unknown_id_among_several_costs_no_extra_poll(ids: list[str]) -> None:
    # PBS Pro prints the jobs it knows, names the unknown ones on stderr (with its suffix,
    # whatever was asked) and exits 153: nothing is left to ask again.
    # Several ids are asked in the text form: OpenPBS 23.06's -F json shows only the first.
    stdout = _answer("15_qstat_x_f_text_walltime_killed")[0]
    transport = Replay({f"-f -x {' '.join(ids)}": (stdout, "qstat: Unknown Job Id 9999.vm\n", 153)})
    scheduler = pbs.PbsScheduler(transport, flavour="pbspro")
    found = scheduler.status(ids)
    assert list(found) == [ids[0]]
    assert scheduler.status_calls == 1


@pytest.mark.parametrize(
    "name", ["25_qstat_f_json_finished_without_x", "50_qstat_f_json_child_of_fail_no_x"]
)
def test_recorded_finished_without_x_is_a_failed_poll_not_a_vanished_job(name: str) -> None:
    # hpcbridge always asks with -x; should a server answer like this, no job is dropped.
    record = _load(name)
    assert not pbs_commands.unknown_job(record.stderr, record.exit_code)
    job_id = "3.vm" if name.startswith("25") else "7.vm"
    transport = Replay({_poll_argv(job_id): _answer(name)})
    with pytest.raises(SchedulerError, match="qstat failed: .*Job has finished"):
        pbs.PbsScheduler(transport, flavour="pbspro").status([job_id])


@pytest.mark.parametrize(
    ("name", "job_id", "unknown"),
    [
        ("22_qdel_running", "3.vm", []),
        ("26_qdel_finished_job", "3.vm", []),  # exit 35: nothing left to cancel
        ("27_qdel_unknown_id", "9999.vm", ["9999.vm"]),
        ("27_qdel_unknown_id", "9999", ["9999"]),  # asked without the suffix
    ],
)
def test_recorded_qdel(name: str, job_id: str, unknown: list[str]) -> None:
    transport = Replay({job_id: _answer(name)})
    assert pbs.PbsScheduler(transport, flavour="pbspro").cancel([job_id]) == unknown


def test_array_subjob_killed_by_walltime_explains_the_array() -> None:
    # An array and its subjobs as PBS Pro prints them with -t, made from the recorded job.
    one = _wallkill_text()
    parent = one.replace("Job Id: 2.vm", "Job Id: 8[].vm").replace("job_state = F", "job_state = B")
    parent = parent.replace("    Exit_status = -29\n", "")
    ok = one.replace("Job Id: 2.vm", "Job Id: 8[1].vm").replace("job_state = F", "job_state = X")
    ok = ok.replace("= -29", "= 0").replace("exceeded resource walltime", "finished")
    killed = one.replace("Job Id: 2.vm", "Job Id: 8[2].vm").replace(
        "job_state = F", "job_state = X"
    )
    transport = Replay({"-f 8[].vm": (parent + ok + killed, "", 0)})
    # the array's own record is the answer asked for; its subjobs are not merged into it ...
    assert pbs.PbsScheduler(transport, flavour="torque").status(["8[].vm"])["8[].vm"].state is (
        State.RUNNING
    )
    # ... and without it, the subjobs make up the array, the killed one explaining it
    transport = Replay({"-f 8[].vm": (ok + killed, "", 0)})
    merged = pbs.PbsScheduler(transport, flavour="torque").status(["8[].vm"])["8[].vm"]
    assert (merged.state, merged.exit_code) == (State.FAILED, -29)
    assert explain_kill(merged) == WALLTIME_KILL


# --- what hpcbridge.jobs makes of it -----------------------------------------------------------


class Files(Replay):
    """A transport that only reads the job's state files."""

    def __init__(self, files: dict[str, str]) -> None:
        super().__init__({})
        self.files = files

    def read_text(self, path: str, *, limit: int = 0) -> str | None:
        return self.files.get(path)


def _job(**changes: object) -> Job:
    base = Job(
        native_id="2.vm",
        scheduler="pbs",
        host="",
        script="/w/.hpcbridge/job.sh",
        work_dir="/w",
        name="wallkill",
        submitted="2026-12-07T16:45:18Z",
        state=State.RUNNING.value,
    )
    return Job(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def _recorded(name: str, job_id: str) -> JobStatus:
    return _parse(_load(name))[job_id]


def test_walltime_kill_wins_over_the_143_in_the_status_file() -> None:
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 143, "end": "x"}'})
    status = _recorded("14_qstat_x_f_json_walltime_killed", "2.vm")
    job = _resolve(_job(), status, files)
    assert (job.state, job.exit_code, job.reason) == ("failed", 143, WALLTIME_KILL)


def test_walltime_kill_with_no_status_file() -> None:
    # SIGKILLed before its trap could write: the scheduler's cause once the grace has passed.
    files = Files({"/w/.hpcbridge/started.json": "{}"})
    status = _recorded("15_qstat_x_f_text_walltime_killed", "2.vm")
    job = _resolve(_job(ended_seen=1.0), status, files)
    assert (job.state, job.exit_code, job.reason) == ("failed", -29, WALLTIME_KILL)
    assert STATUS_FILE_GRACE < 1e9


def test_script_failure_reads_as_its_exit_code() -> None:
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 3, "end": "x"}'})
    job = _resolve(_job(native_id="1.vm"), _recorded("13_qstat_x_f_json_exit3", "1.vm"), files)
    assert (job.state, job.reason) == ("failed", "exit code 3")


def test_qdel_of_a_running_job_says_who() -> None:
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 143, "end": "x"}'})
    job = _resolve(_job(native_id="3.vm"), _recorded("24_qstat_x_f_json_after_qdel", "3.vm"), files)
    assert job.reason == "deleted by pbsuser@localhost: killed by signal 15 (SIGTERM)"


def test_a_child_deleted_because_its_parent_failed_is_cancelled() -> None:
    status = _recorded("49_qstat_x_f_json_child_of_fail", "7.vm")
    job = _resolve(_job(native_id="7.vm", state=State.HELD.value), status, Files({}))
    assert (job.state, job.exit_code, job.reason) == ("cancelled", None, pbs_commands.NEVER_RAN)
    by_scheduler = _resolve_by_scheduler(_job(native_id="7.vm", work_dir=None), status)
    assert (by_scheduler.state, by_scheduler.reason) == ("cancelled", pbs_commands.NEVER_RAN)


@pytest.mark.parametrize(
    ("name", "job_id", "state", "reason"),
    [
        ("14_qstat_x_f_json_walltime_killed", "2.vm", "failed", WALLTIME_KILL),
        ("13_qstat_x_f_json_exit3", "1.vm", "failed", "and failed"),
        (
            "24_qstat_x_f_json_after_qdel",
            "3.vm",
            "cancelled",
            "deleted by pbsuser@localhost: killed by signal 15 (SIGTERM)",
        ),
        ("05_qstat_x_f_json_finished_ok", "0.vm", "finished", "and finished"),
    ],
)
def test_scripts_hpcbridge_did_not_render_are_judged_by_the_scheduler(
    name: str, job_id: str, state: str, reason: str
) -> None:
    job = _resolve_by_scheduler(_job(native_id=job_id, work_dir=None), _recorded(name, job_id))
    assert job.state == state
    assert job.reason.endswith(reason)


def test_jobs_wait_progress_line_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    # `hpcbridge jobs --wait` prints each change; a killed job's line must say what killed it.
    from hpcbridge.cli.jobs import _progress
    from hpcbridge.jobs import PollReport

    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 143, "end": "x"}'})
    job = _resolve(_job(), _recorded("14_qstat_x_f_json_walltime_killed", "2.vm"), files)
    _progress(False)(PollReport([job], [job]))
    assert capsys.readouterr().err == (
        f"job 2.vm (wallkill): failed, exit code 143 ({WALLTIME_KILL})\n"
    )


def test_a_job_the_server_could_not_run_says_so() -> None:
    text = _wallkill_text().replace("= -29", "= -1").replace("exceeded resource walltime", "failed")
    status = pbs_commands.parse_qstat_full(text)["2.vm"]
    job = _resolve(_job(), status, Files({}))  # it never started: no file at all
    assert (job.state, job.exit_code) == ("failed", -1)
    assert job.reason.startswith("the server could not run the job (execution failed before")


def test_several_ids_are_polled_in_the_text_form_one_in_json() -> None:
    # The real server answered `qstat -x -f -F json 13.vm 14.vm 15.vm` with job 13 alone and
    # exit 0, so a poll of several jobs would lose all but the first.
    text = _answer("15_qstat_x_f_text_walltime_killed")[0]
    as_json = _answer("14_qstat_x_f_json_walltime_killed")
    transport = Replay({"-f -x 2.vm 5.vm": (text, "", 0), _poll_argv("2.vm"): as_json})
    scheduler = pbs.PbsScheduler(transport, flavour="pbspro")
    assert scheduler.status(["2.vm", "5.vm"])["2.vm"].killed_by == "walltime"
    assert scheduler.status(["2.vm"])["2.vm"].killed_by == "walltime"
    assert [c[:4] for c in transport.calls] == [
        ["qstat", "-f", "-x", "2.vm"],
        ["qstat", "-f", "-F", "json"],
    ]


def test_a_failed_parent_the_server_marked_terminated_is_a_failure() -> None:
    # Seen on the real server: a job that exited 3 and had an afterok child ended with
    # substate 91 and "... and terminated by root@localhost" (the server deleting the child),
    # though nobody deleted it. Its exit status is the truth.
    text = _answer("13_qstat_x_f_json_exit3")[0]
    text = text.replace('"substate":\t93', '"substate":\t91').replace(
        "and failed", "and terminated by root@localhost"
    )
    status = pbs_commands.parse_qstat_json(text)["1.vm"]
    assert (status.state, status.exit_code) == (State.FAILED, 3)
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 3, "end": "x"}'})
    job = _resolve(_job(native_id="1.vm"), status, files)
    assert (job.state, job.exit_code, job.reason) == ("failed", 3, "exit code 3")


def test_an_ended_script_waits_for_its_job_to_end() -> None:
    # The script wrote its outcome while PBS still holds the job in E, delivering its -o/-e
    # files (and, for a kill, its cause): nothing is final until the job leaves.
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 143, "end": "x"}'})
    exiting = replace(_recorded("14_qstat_x_f_json_walltime_killed", "2.vm"), state=State.RUNNING)
    waiting = _resolve(_job(), exiting, files)
    assert (waiting.state, waiting.exit_code) == ("running", None)
    assert waiting.ended_seen is not None
    ended = _resolve(waiting, _recorded("14_qstat_x_f_json_walltime_killed", "2.vm"), files)
    assert (ended.state, ended.reason) == ("failed", WALLTIME_KILL)
    # a scheduler that never lets go does not hold the outcome back past the grace
    stuck = _resolve(_job(ended_seen=1.0), exiting, files)
    assert (stuck.state, stuck.exit_code) == ("failed", 143)


def test_one_unknown_id_does_not_keep_the_others_running() -> None:
    # Seen on the real server: `qdel 290.vm 9999.vm 291.vm` exits 153 naming 9999.vm, and
    # 290 and 291 run on: nothing was deleted. Each id is then deleted alone.
    unknown = _answer("27_qdel_unknown_id")
    transport = Replay(
        {
            "qdel 290.vm 9999.vm 291.vm": unknown,
            "qdel 290.vm": ("", "", 0),
            "qdel 9999.vm": unknown,
            "qdel 291.vm": _answer("26_qdel_finished_job"),
        }
    )
    assert pbs.PbsScheduler(transport, flavour="pbspro").cancel(
        ["290.vm", "9999.vm", "291.vm"]
    ) == ["9999.vm"]
    assert transport.calls[1:] == [["qdel", "290.vm"], ["qdel", "9999.vm"], ["qdel", "291.vm"]]


def test_an_array_whose_subjob_failed_is_failed() -> None:
    # The real server ends such an array F, substate 93, with Exit_status 0 and the comment
    # "Job Array Began at ... and failed".
    text = _answer("13_qstat_x_f_json_exit3")[0].replace('"1.vm"', '"8[].vm"')
    text = text.replace('"Exit_status":\t3', '"Exit_status":\t0')
    text = text.replace("Job run at", "Job Array Began at")
    status = pbs_commands.parse_qstat_json(text)["8[].vm"]
    assert (status.state, status.exit_code) == (State.FAILED, None)
    assert status.reason.endswith("and failed")


def test_a_job_deleted_while_it_ran_is_cancelled_not_failed() -> None:
    # Its script's trap recorded 143 (SIGTERM); the scheduler says a user deleted it.
    files = Files({"/w/.hpcbridge/status.json": '{"exit_code": 143, "end": "x"}'})
    job = _resolve(_job(native_id="3.vm"), _recorded("24_qstat_x_f_json_after_qdel", "3.vm"), files)
    assert (job.state, job.exit_code) == ("cancelled", 143)
    assert job.reason == "deleted by pbsuser@localhost: killed by signal 15 (SIGTERM)"


def test_a_deleted_job_says_the_same_without_its_status_file() -> None:
    # The scheduler ended it before its trap wrote anything: the reason does not depend on that.
    files = Files({"/w/.hpcbridge/started.json": "{}"})
    job = _resolve(_job(native_id="3.vm"), _recorded("24_qstat_x_f_json_after_qdel", "3.vm"), files)
    assert (job.state, job.exit_code) == ("cancelled", 143)
    assert job.reason == "deleted by pbsuser@localhost: killed by signal 15 (SIGTERM)"
