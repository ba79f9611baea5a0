"""The errors a user meets when the scheduler or the profile is not what hpcbridge needs:
each is one line, with the right exit code, and nothing is half-done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.jobs import Job, JobStore

SCRIPT = "#!/bin/bash\necho hello\n"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture()
def bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH with the shell tools a submission needs and no scheduler commands at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "find", "tail"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


@pytest.mark.parametrize(("scheduler", "command"), [("pbs", "qstat"), ("slurm", "sbatch")])
def test_submit_where_the_scheduler_is_not_installed(
    scheduler: str, command: str, tmp_path: Path, bare_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_SCHEDULER", scheduler)
    script = tmp_path / "job.sh"
    script.write_text(SCRIPT)
    line = one_line_error(run("submit", str(script)), 1)
    assert line == f"hpcbridge: error: {command}: command not found on this machine"
    assert json.loads(run("--json", "jobs", "--all").stdout) == []  # nothing recorded


def test_a_failed_poll_changes_nothing_and_says_so(
    isolated_home: Path, bare_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HPCBRIDGE_SCHEDULER", "slurm")
    store = JobStore(isolated_home, "default")
    queued = Job(
        native_id="4242", scheduler="slurm", host="", script="/w/job.sh", work_dir="/w",
        name="conv",
        submitted="2026-11-26T00:00:00Z", state="queued", raw_state="PENDING",
    )  # fmt: skip
    store.save(queued)
    result = run("jobs")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "hpcbridge: error: could not poll the scheduler: squeue: command not found on this "
        "machine (the states shown are the last known ones)"
    )
    assert "4242  conv  queued (PENDING)" in result.stdout
    assert JobStore(isolated_home, "default").get("4242") == queued


def test_a_run_over_ssh_needs_a_work_root_and_records_nothing_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing here reaches the network: the profile is refused before any connection.
    monkeypatch.setenv("HPCBRIDGE_XNAT", "http://127.0.0.1:9")
    monkeypatch.setenv("HPCBRIDGE_USER", "alice")
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", "not-used")
    monkeypatch.setenv("HPCBRIDGE_SCHEDULER", "slurm")
    monkeypatch.setenv("HPCBRIDGE_HOST", "login.example.org")
    line = one_line_error(run("run", "dcm2niix", "PTV000"), 2)
    assert line == (
        "hpcbridge: error: profile 'default' submits to login.example.org but sets no "
        "work_root: the absolute folder on the cluster where runs keep their data "
        '(add e.g. work_root = "/scratch/PROJECT/hpcbridge" to the profile)'
    )
    monkeypatch.setenv("HPCBRIDGE_WORK_ROOT", "scratch/hpcbridge")
    line = one_line_error(run("run", "dcm2niix", "PTV000"), 2)
    assert line == "hpcbridge: error: work_root must be an absolute path, not 'scratch/hpcbridge'"
    assert "no runs yet" in one_line_error(run("status"), 2)


def test_demo_without_dcm2niix_says_how_to_get_it(tmp_path: Path) -> None:
    """A Python whose folder has no dcm2niix, and a PATH without one."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
        timeout=120,
    )
    assert not (venv / "bin" / "dcm2niix").exists()
    env = dict(os.environ, PATH=str(venv / "bin"), HPCBRIDGE_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "hpcbridge", "demo"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "hpcbridge: error: dcm2niix is not installed: the demo runs the real converter "
        "(`pip install dcm2niix` (or your system's dcm2niix package))"
    )
    assert not (tmp_path / "home" / "sandbox").exists()  # no sandbox was started
