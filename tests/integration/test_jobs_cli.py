"""submit, jobs and cancel from the command line, on the default profile's local scheduler.

Job scripts come from `hpcbridge render` of a tiny recipe whose command each test writes. Jobs
that must stay alive wait for a "gate" file the test creates; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hpcbridge.cli import main

WAIT_FOR_GATE = 'for _ in $(seq 600); do [ -e "$HPCBRIDGE_WORK/gate" ] && break; sleep 0.1; done'
WAIT = ["--interval", "0.1", "--timeout", "30"]


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def one_line_error(result: Result, code: int) -> str:
    """The single ``hpcbridge: error:`` line of a failed command, checked."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpcbridge: error: ")
    return lines[0]


def table(stdout: str) -> dict[str, dict[str, str]]:
    """Rows of a `jobs` table by job id, cut at the header's column starts."""
    lines = stdout.splitlines()
    header = lines[0]
    names = header.split()
    starts = [header.index(name) for name in names]
    rows = {}
    for line in lines[1:]:
        cells = [
            line[start : starts[i + 1] if i + 1 < len(starts) else None].strip()
            for i, start in enumerate(starts)
        ]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


@pytest.fixture()
def script(tmp_path: Path) -> Callable[..., Path]:
    """Render (with `hpcbridge render`) a local job script whose command is ``body``."""

    def make(name: str, body: str, walltime: str = "00:10:00") -> Path:
        recipe = tmp_path / "recipes" / f"{name}.toml"
        recipe.parent.mkdir(exist_ok=True)
        recipe.write_text(
            f'name = "{name}"\n[resources]\nwalltime = "{walltime}"\n'
            f"[run]\ncommand = '''\n{body}\n'''\n"
        )
        out = tmp_path / "scripts" / f"{name}.sh"
        out.parent.mkdir(exist_ok=True)
        result = run(
            "render",
            str(recipe),
            "--scheduler",
            "local",
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out" / name),
            "--work",
            str(tmp_path / "work" / name),
            "-o",
            str(out),
        )
        assert result.exit_code == 0, result.output
        return out

    return make


@pytest.fixture(autouse=True)
def no_runner_left_behind(no_local_jobs_left: None) -> None:
    """Every test ends with no local job left running (tests/conftest.py)."""


def gate(tmp_path: Path, name: str) -> None:
    (tmp_path / "work" / name / "gate").touch()


def started(tmp_path: Path, name: str) -> bool:
    return (tmp_path / "work" / name / ".hpcbridge" / "started.json").exists()


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- submit -----------------------------------------------------------------------------------


def test_submit_prints_only_the_job_id(script: Callable[..., Path]) -> None:
    ok = script("ok", "echo fine")
    first = run("submit", str(ok))
    assert first.exit_code == 0, first.output
    assert first.stdout == "1\n"
    second = run("submit", str(script("again", "echo fine")))
    assert second.stdout == "2\n"
    done = run("jobs", "--wait", *WAIT)
    assert done.exit_code == 0, done.output
    rows = table(done.stdout)
    assert {i: r["STATE"] for i, r in rows.items()} == {"1": "finished", "2": "finished"}
    assert rows["1"]["NAME"] == "ok" and rows["1"]["EXIT"] == "0"


def test_json_submit_prints_the_job_record(script: Callable[..., Path], tmp_path: Path) -> None:
    result = run("--json", "submit", str(script("ok", "true")))
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert isinstance(record, dict)
    assert record["id"] == "1"
    assert record["scheduler"] == "local"
    assert record["state"] == "queued"
    assert record["work_dir"] == str(tmp_path / "work" / "ok")
    assert record["script"] == str(tmp_path / "work" / "ok" / ".hpcbridge" / "job.sh")
    assert run("jobs", "1", "--wait", *WAIT).exit_code == 0


def test_submit_wait_reports_the_outcome(script: Callable[..., Path]) -> None:
    ok = run("submit", str(script("ok", "echo fine")), "--wait", *WAIT)
    assert ok.exit_code == 0, ok.output
    assert table(ok.stdout)["1"]["STATE"] == "finished"
    assert "submitted job 1; waiting for it to end" in ok.stderr
    bad = run("submit", str(script("bad", "echo 'out of memory' >&2; exit 3")), "--wait", *WAIT)
    assert bad.exit_code == 3
    assert table(bad.stdout)["2"]["STATE"] == "failed"
    assert "out of memory" in bad.stderr
    assert "1 of 1 job(s) did not finish successfully: 2 failed" in bad.stderr


def test_submit_after_and_array_from_the_command_line(script: Callable[..., Path]) -> None:
    head = run("submit", str(script("head", "true"))).stdout.strip()
    body = 'touch "$HPCBRIDGE_WORK/done.$HPCBRIDGE_ARRAY_INDEX"'
    arr = run("submit", str(script("arr", body)), "--after", head, "--array", "1-3")
    assert arr.exit_code == 0, arr.output
    done = run("--json", "jobs", head, arr.stdout.strip(), "--wait", *WAIT)
    assert done.exit_code == 0, done.output
    records = json.loads(done.stdout)
    assert [(r["id"], r["state"], r["after"], r["array"]) for r in records] == [
        ("1", "finished", [], None),
        ("2", "finished", ["1"], "1-3"),
    ]


def test_submit_errors_are_one_line(script: Callable[..., Path], tmp_path: Path) -> None:
    missing = one_line_error(run("submit", str(tmp_path / "nope.sh")), 1)
    assert missing == f"hpcbridge: error: no such job script: {tmp_path / 'nope.sh'}"
    plain = tmp_path / "plain.sh"
    plain.write_text("echo no interpreter line\n")
    line = one_line_error(run("submit", str(plain)), 1)
    assert "does not start with #!" in line and str(plain) in line
    ok = script("ok", "true")
    line = one_line_error(run("submit", str(ok), "--array", "bad"), 1)
    assert "invalid array range 'bad'" in line and "1-10" in line
    line = one_line_error(run("submit", str(ok), "--after", "77"), 1)
    assert "cannot depend on job 77" in line
    line = one_line_error(run("submit", str(ok), "--after", "4242.pbsserver"), 1)
    assert "not local job ids" in line
    assert run("jobs", "--all").stderr == "no jobs\n"  # none of these submitted anything


def test_submit_after_a_failed_job_is_refused(script: Callable[..., Path]) -> None:
    assert run("submit", str(script("bad", "exit 3")), "--wait", *WAIT).exit_code == 3
    line = one_line_error(run("submit", str(script("next", "true")), "--after", "1"), 1)
    assert "job 1 already failed" in line


def test_a_busy_work_folder_is_refused(script: Callable[..., Path], tmp_path: Path) -> None:
    busy = script("busy", WAIT_FOR_GATE)
    assert run("submit", str(busy)).exit_code == 0
    line = one_line_error(run("submit", str(busy)), 1)
    assert f"work folder {tmp_path / 'work' / 'busy'} belongs to job 1" in line
    gate(tmp_path, "busy")
    assert run("jobs", "1", "--wait", *WAIT).exit_code == 0
    again = run("submit", str(busy))
    assert again.stdout == "2\n"
    # The new job is not taken for finished from the last run's status file.
    assert table(run("jobs", "2").stdout)["2"]["STATE"].split()[0] in ("queued", "running")
    gate(tmp_path, "busy")
    assert run("jobs", "2", "--wait", *WAIT).exit_code == 0


# --- jobs -------------------------------------------------------------------------------------


def test_jobs_table_shows_each_state(script: Callable[..., Path], tmp_path: Path) -> None:
    run("submit", str(script("long", WAIT_FOR_GATE)))
    run("submit", str(script("later", "true")), "--after", "1")
    run("submit", str(script("bad", "echo 'bad input' >&2; exit 3")))
    eventually(lambda: started(tmp_path, "long"), "the first job to start")
    assert run("jobs", "3", "--wait", *WAIT).exit_code == 3
    result = run("jobs")
    assert result.exit_code == 0, result.output
    rows = table(result.stdout)
    assert result.stdout.splitlines()[0].split() == [
        "ID",
        "NAME",
        "STATE",
        "EXIT",
        "SUBMITTED",
        "ENDED",
        "REASON",
    ]
    assert rows["1"]["STATE"].startswith("running")
    assert rows["2"]["STATE"].startswith("queued")
    assert (rows["3"]["STATE"], rows["3"]["EXIT"], rows["3"]["REASON"]) == (
        "failed",
        "3",
        "exit code 3",
    )
    assert "bad input" in result.stderr  # a failed job's log tail
    cancelled = run("cancel", "1")
    assert cancelled.stdout == "1: cancelled\n"
    rows = table(run("jobs", "--wait", *WAIT).stdout)
    assert [rows[i]["STATE"] for i in "123"] == ["cancelled", "cancelled", "failed"]
    assert "job 1" in rows["2"]["REASON"] or "dependency 1" in rows["2"]["REASON"]


def test_jobs_wait_exits_3_and_shows_the_log_of_a_failed_job(
    script: Callable[..., Path],
) -> None:
    run("submit", str(script("ok", "echo fine")))
    body = "echo 'reading input'\necho 'ERROR: no DICOM files found' >&2\nexit 3"
    run("submit", str(script("broken", body)))
    result = run("jobs", "--wait", *WAIT)
    assert result.exit_code == 3
    rows = table(result.stdout)
    assert (rows["1"]["STATE"], rows["2"]["STATE"], rows["2"]["EXIT"]) == (
        "finished",
        "failed",
        "3",
    )
    err = result.stderr
    assert "--- job 2 (broken) failed; last lines of its log:\nERROR: no DICOM files found" in err
    assert "job 2 (broken): failed, exit code 3" in err  # progress while waiting
    assert err.rstrip().endswith(
        "hpcbridge: error: 1 of 2 job(s) did not finish successfully: 2 failed"
    )
    assert "Traceback" not in err


def test_jobs_wait_gives_up_after_its_timeout_and_the_job_keeps_running(
    script: Callable[..., Path], tmp_path: Path
) -> None:
    run("submit", str(script("long", WAIT_FOR_GATE)))
    eventually(lambda: started(tmp_path, "long"), "the job to start")
    result = run("jobs", "1", "--wait", "--interval", "0.1", "--timeout", "0.5")
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "hpcbridge: error: jobs still running after 0.5 s: 1 "
        "(they keep running; check later with `hpcbridge jobs`)"
    )
    assert table(run("jobs").stdout)["1"]["STATE"].startswith("running")
    gate(tmp_path, "long")
    assert run("jobs", "1", "--wait", *WAIT).exit_code == 0


def test_jobs_json(script: Callable[..., Path]) -> None:
    run("submit", str(script("ok", "true")))
    assert run("jobs", "--wait", *WAIT).exit_code == 0
    records = json.loads(run("--json", "jobs").stdout)
    assert [(r["id"], r["state"], r["exit_code"]) for r in records] == [("1", "finished", 0)]
    assert "ended_seen" not in records[0]


def test_jobs_of_an_unknown_id_is_a_one_line_error() -> None:
    line = one_line_error(run("jobs", "999"), 1)
    assert line.startswith("hpcbridge: error: unknown job id(s): 999")
    line = one_line_error(run("jobs", "x1"), 1)
    assert "not local job ids: 'x1'" in line


def test_no_jobs_yet() -> None:
    result = run("jobs")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "no jobs\n")


def test_the_local_concurrency_limit_comes_from_the_environment(
    script: Callable[..., Path], tmp_path: Path
) -> None:
    env = {"HPCBRIDGE_LOCAL_MAX_JOBS": "1"}
    run("submit", str(script("first", WAIT_FOR_GATE)), env=env)
    run("submit", str(script("second", "true")), env=env)
    eventually(lambda: started(tmp_path, "first"), "the first job to start")
    for _ in range(3):
        time.sleep(0.1)
        rows = table(run("jobs").stdout)
        assert rows["1"]["STATE"].startswith("running")
        assert rows["2"]["STATE"].startswith("queued")
        assert not started(tmp_path, "second")
    gate(tmp_path, "first")
    assert run("jobs", "--wait", *WAIT).exit_code == 0


def test_jobs_survive_the_cli_process(script: Callable[..., Path], tmp_path: Path) -> None:
    env = dict(os.environ)
    job = script("long", f'{WAIT_FOR_GATE}\necho done > "$HPCBRIDGE_WORK/out"')
    cli = [sys.executable, "-m", "hpcbridge"]
    sub = subprocess.run(
        [*cli, "submit", str(job)], capture_output=True, text=True, timeout=60, env=env
    )
    assert (sub.returncode, sub.stdout) == (0, "1\n"), sub.stderr
    eventually(lambda: started(tmp_path, "long"), "the job to start after the CLI exited")
    gate(tmp_path, "long")
    waited = subprocess.run(
        [*cli, "jobs", "--wait", *WAIT], capture_output=True, text=True, timeout=60, env=env
    )
    assert waited.returncode == 0, waited.stderr
    assert table(waited.stdout)["1"]["STATE"] == "finished"
    assert (tmp_path / "work" / "long" / "out").read_text() == "done\n"


# --- cancel -----------------------------------------------------------------------------------


def test_cancel_prints_each_id_and_its_state(script: Callable[..., Path], tmp_path: Path) -> None:
    run("submit", str(script("long", WAIT_FOR_GATE)))
    run("submit", str(script("ok", "true")))
    eventually(lambda: started(tmp_path, "long"), "the job to start")
    assert run("jobs", "2", "--wait", *WAIT).exit_code == 0
    result = run("cancel", "1", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "1: cancelled\n2: finished\n"  # an ended job stays as it ended
    rows = table(run("jobs", "--wait", *WAIT).stdout)
    assert (rows["1"]["STATE"], rows["2"]["STATE"]) == ("cancelled", "finished")


def test_cancel_of_an_unknown_id() -> None:
    line = one_line_error(run("cancel", "999"), 1)
    assert line.startswith("hpcbridge: error: unknown job id(s): 999")
    assert one_line_error(run("cancel", "abc"), 1) == "hpcbridge: error: not local job ids: 'abc'"
    usage = run("cancel")
    # cancel takes job ids or --run RUN_ID, and says so
    assert usage.exit_code == 2 and "give job ids or --run RUN_ID" in usage.stderr
    both = run("cancel", "1", "--run", "1")
    assert both.exit_code == 2 and "give job ids or --run RUN_ID" in both.stderr


# --- profile errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["jobs"], ["cancel", "1"], ["submit", "x.sh"]])
def test_a_bad_scheduler_setting_is_a_config_error(command: list[str]) -> None:
    line = one_line_error(run(*command, env={"HPCBRIDGE_SCHEDULER": "nope"}), 2)
    assert line == (
        "hpcbridge: error: environment HPCBRIDGE_SCHEDULER: scheduler must be one of "
        "local, pbs, torque, slurm, not 'nope'"
    )


def test_a_bad_local_max_jobs_is_a_config_error() -> None:
    line = one_line_error(run("jobs", env={"HPCBRIDGE_LOCAL_MAX_JOBS": "0"}), 2)
    assert "local_max_jobs must be a whole number from 1 to 1024, not '0'" in line


def test_a_host_with_the_local_scheduler_is_refused(
    isolated_home: Path, script: Callable[..., Path]
) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        '[profiles.default]\nhost = "login.example.org"\nscheduler = "local"\n'
    )
    job = script("ok", "true")
    for command in (["jobs"], ["submit", str(job)], ["cancel", "1"]):
        line = one_line_error(run(*command), 2)
        assert "sets host = 'login.example.org' with the local scheduler" in line
        assert "set scheduler = pbs or slurm" in line
    assert not (isolated_home / "local-jobs").exists()  # nothing ran


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ("submit", "hpcbridge submit job.sh"),
        ("jobs", "hpcbridge jobs 4242 4243 --wait"),
        ("cancel", "hpcbridge cancel 4242 4243"),
    ],
)
def test_help_shows_an_example(command: str, example: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout
    assert example in result.stdout
