"""Real jobs on a real scheduler: SSH to the loopback sshd, then qsub (Slurm's PBS wrappers) or
sbatch on the single-node Slurm that tests/cluster/up.sh started, running the real dcm2niix.

Every test goes through the command line a user types, with a profile that names the SSH host.
The cluster and the test share one machine, so the job's files are checked directly. (Whole
runs, XNAT -> SSH -> the scheduler -> XNAT, are tests/integration/test_runs.py's and
test_chains.py's, written once for the local scheduler and the clusters.)
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.jobs import JobStore, open_scheduler, open_transport, submit_script, wait_for
from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files

pytestmark = pytest.mark.e2e

WAIT = ("--interval", "0.3", "--timeout", "120")

FAIL_RECIPE = '''name = "fail"
description = "says why, then exits 3"
[run]
command = """
echo "boom: cannot convert {{ input_dir }}" >&2
exit 3
"""
[resources]
memory = "100MB"
walltime = "00:05:00"
'''

SLEEP_RECIPE = '''name = "sleepy"
description = "sleeps long enough to be cancelled"
[run]
command = """
echo $$ > {{ output_dir }}/pid
sleep 300
"""
[resources]
memory = "100MB"
walltime = "00:10:00"
'''

# Slurm's shortest time limit is a minute; slurmctld notices the overrun within its next check.
OVERRUN_RECIPE = SLEEP_RECIPE.replace("sleepy", "overrun").replace('"00:10:00"', '"00:01:00"')
NAP_RECIPE = SLEEP_RECIPE.replace("sleepy", "nap").replace("sleep 300", "sleep 3")


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture()
def recipes_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "fail.toml").write_text(FAIL_RECIPE)
    (folder / "sleepy.toml").write_text(SLEEP_RECIPE)
    (folder / "nap.toml").write_text(NAP_RECIPE)
    (folder / "overrun.toml").write_text(OVERRUN_RECIPE)
    return folder


def dicom_series(folder: Path, *, series: int = 4, slices: int = 16) -> Path:
    folder.mkdir(parents=True)
    for name, data in series_files(
        SeriesSpec(series, "Ax 3D T1", n_slices=slices),
        patient_id="E2E",
        patient_name="E2E^Test",
        study_uid=make_uid("e2e", str(series)),
    ):
        (folder / name).write_bytes(data)
    return folder


def render(kind: str, tmp: Path, name: str, recipe: str = "dcm2niix", *extra: str) -> Path:
    """Render a recipe for the profile's scheduler into tmp/name/ (input tmp/name/in)."""
    base = tmp / name
    scheduler = "pbs" if kind == "pbspro" else kind  # PBS Pro and the wrappers share a skeleton
    if not (base / "in").exists():
        dicom_series(base / "in")
    script = base / "job.sh"
    result = cli(
        "render", recipe, "--scheduler", scheduler, "--input", str(base / "in"),
        "--output", str(base / "out"), "--name", name, "-o", str(script), *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return script


def submit(script: Path, *extra: str) -> str:
    result = cli("submit", str(script), *extra)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    # Slurm and its wrappers print a number, PBS Pro the number ([] for an array) and its server
    assert re.fullmatch(r"\d+(\[\])?(\.[\w.-]+)?", job_id), result.stdout
    return job_id


def job_record(job_id: str) -> dict[str, Any]:
    result = cli("--json", "jobs", job_id)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    return record


def wait_until(predicate: Any, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:g} s waiting for {what}")
        time.sleep(0.2)


def test_dcm2niix_job_converts_through_ssh(kind: str, tmp_path: Path) -> None:
    script = render(kind, tmp_path, "convert")
    job_id = submit(script)
    waited = cli("jobs", job_id, "--wait", *WAIT)
    assert waited.exit_code == 0, waited.output
    out = tmp_path / "convert" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz"]
    assert json.loads((out / "Ax_3D_T1_4.json").read_text())["SeriesNumber"] == 4
    record = job_record(job_id)
    assert (record["state"], record["exit_code"]) == ("finished", 0)
    # the job wrote its own outcome, naming the scheduler's id for it
    status = json.loads((tmp_path / "convert" / ".hpcbridge" / "status.json").read_text())
    assert status["exit_code"] == 0 and status["job_id"].startswith(job_id)


def test_afterok_chain_runs_in_order_and_a_failure_cancels_the_rest(
    kind: str, tmp_path: Path, recipes_dir: Path, scheduler_queue: Any
) -> None:
    first = submit(render(kind, tmp_path, "first"))
    failing = render(kind, tmp_path, "second", "fail", "--recipes", str(recipes_dir))
    second = submit(failing, "--after", first)
    third = submit(render(kind, tmp_path, "third"), "--after", second)
    fourth = submit(render(kind, tmp_path, "fourth"), "--after", third)

    waited = cli("jobs", first, second, third, fourth, "--wait", *WAIT)
    assert waited.exit_code == 3, waited.output  # partial: some jobs did not succeed
    states = {i: job_record(i) for i in (first, second, third, fourth)}
    assert states[first]["state"] == "finished"
    assert (states[second]["state"], states[second]["exit_code"]) == ("failed", 3)
    assert "boom: cannot convert" in states[second]["log_tail"]
    assert "boom: cannot convert" in waited.stderr
    for later in (third, fourth):
        assert states[later]["state"] == "cancelled"
        assert "depends on" in states[later]["reason"]
    # The dependent really waited for its parent to end before it started.
    ended = json.loads((tmp_path / "first" / ".hpcbridge" / "status.json").read_text())["end"]
    started = json.loads((tmp_path / "second" / ".hpcbridge" / "started.json").read_text())
    assert started["start"] >= ended
    # ...and the scheduler no longer holds the cancelled ones pending forever.
    assert not (tmp_path / "third" / ".hpcbridge" / "started.json").exists()
    if kind == "pbspro":
        # PBS Pro deletes a job whose afterok parent failed by itself: it ends without running
        ended = {j.id: j.state for j in scheduler_queue.all()}
        assert (ended[third], ended[fourth]) == ("CANCELLED", "CANCELLED")
        return
    queue = subprocess.run(
        ["squeue", "-h", "-j", f"{third},{fourth}", "-o", "%T"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "PENDING" not in queue.stdout


def test_array_job_runs_every_task(kind: str, tmp_path: Path) -> None:
    script = render(kind, tmp_path, "array")
    job_id = submit(script, "--array", "1-2")
    waited = cli("jobs", job_id, "--wait", *WAIT)
    assert waited.exit_code == 0, waited.output
    state_dir = tmp_path / "array" / ".hpcbridge"
    for index in (1, 2):
        assert json.loads((state_dir / f"status.{index}.json").read_text())["exit_code"] == 0
    assert (tmp_path / "array" / "out" / "Ax_3D_T1_4.nii.gz").is_file()
    assert job_record(job_id)["state"] == "finished"


def test_cancel_stops_a_running_job(kind: str, tmp_path: Path, recipes_dir: Path) -> None:
    script = render(kind, tmp_path, "sleepy", "sleepy", "--recipes", str(recipes_dir))
    job_id = submit(script)
    pid_file = tmp_path / "sleepy" / "out" / "pid"
    wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), "the job to start")
    assert job_record(job_id)["state"] == "running"
    cancelled = cli("cancel", job_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout.strip() == f"{job_id}: cancelled"
    pid = int(pid_file.read_text())
    wait_until(lambda: not psutil.pid_exists(pid), "the job's shell to be killed")
    record = job_record(job_id)
    assert record["state"] == "cancelled"


@pytest.mark.parametrize("kind", ["slurm"], indirect=True)
def test_a_job_past_its_walltime_says_so(kind: str, tmp_path: Path, recipes_dir: Path) -> None:
    # Slurm ends it TIMEOUT; its script's own trap records only the SIGTERM (143). (PBS Pro's
    # walltime kill is tests/e2e/test_pbspro.py's; the wrappers run the same Slurm.)
    job_id = submit(render(kind, tmp_path, "overrun", "overrun", "--recipes", str(recipes_dir)))
    waited = cli("jobs", job_id, "--wait", "--interval", "1", "--timeout", "240")
    assert waited.exit_code == 3, waited.output
    record = job_record(job_id)
    assert (record["state"], record["exit_code"]) == ("failed", 143)
    assert record["reason"] == (
        "killed: walltime 1:00 exceeded; raise walltime in the recipe's [resources] or the job "
        "script's directives"
    )
    assert record["reason"] in waited.stderr


def test_scheduler_rejection_is_one_clear_line(kind: str, tmp_path: Path) -> None:
    script = render(kind, tmp_path, "rejected", "dcm2niix", "--queue", "nosuchqueue")
    result = cli("submit", str(script))
    assert result.exit_code == 1
    command = "sbatch" if kind == "slurm" else "qsub"
    assert result.stderr.startswith(f"hpcbridge: error: {command} refused the job: ")
    # Slurm (and its wrappers) know partitions, PBS Pro queues
    assert ("queue" if kind == "pbspro" else "partition") in result.stderr.lower()
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert cli("--json", "jobs", "--all").stdout.strip() == "[]"  # nothing recorded


def test_unknown_job_id_is_an_error(kind: str) -> None:
    for command in ("jobs", "cancel"):
        result = cli(command, "987654")
        assert result.exit_code == 1, result.output
        assert "unknown job id(s): 987654" in result.stderr
        assert "Traceback" not in result.output


def test_one_status_call_per_poll_and_an_ssh_drop_is_survived(
    kind: str, tmp_path: Path, login: dict[str, Any], recipes_dir: Path
) -> None:
    settings = load_settings()
    transport = open_transport(settings)
    scheduler = open_scheduler(settings, transport)
    store = JobStore(settings.home, settings.profile)
    try:
        scripts = [
            render(kind, tmp_path, f"poll{i}", "nap", "--recipes", str(recipes_dir))
            for i in range(3)
        ]
        jobs = [submit_script(store, scheduler, s, host=settings.host or "") for s in scripts]
        sshd = psutil.Process(int(Path(login["sshd_pid_file"]).read_text()))
        polls: list[int] = []

        def drop_connection_once(report: Any) -> None:
            polls.append(scheduler.status_calls)
            if len(polls) == 1:
                # what a flaky network or a login-node restart of sshd does to us
                for child in sshd.children(recursive=False):
                    child.kill()

        done = wait_for(
            store, scheduler, [j.native_id for j in jobs], interval=0.3, timeout=120,
            on_poll=drop_connection_once,
        )  # fmt: skip
    finally:
        transport.close()
    assert [j.state for j in done] == ["finished"] * 3
    # each poll asked the scheduler once for all three jobs (a poll after the drop may
    # retry its one call on the new connection)
    assert polls[0] == 1
    assert all(b - a == 1 for a, b in zip(polls, polls[1:], strict=False))
    assert getattr(transport, "connections_opened", None) == 2


def test_unknown_host_key_is_refused_then_accepted_on_request(
    kind: str, tmp_path: Path, isolated_home: Path, login: dict[str, Any]
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = isolated_home / "config.toml"
    config.write_text(config.read_text() + f'known_hosts = "{known_hosts}"\n')
    # Asking about a job the profile never submitted makes the bridge ask the cluster.
    refused = cli("jobs", "987654")
    assert refused.exit_code == 1
    assert "SHA256:" in refused.stderr and "--accept-new-host-key" in refused.stderr
    assert known_hosts.read_text() == ""
    accepted = cli("jobs", "987654", "--accept-new-host-key")
    assert "unknown job id" in accepted.stderr  # connected and asked the scheduler
    key = Path(login["host_key_pub"]).read_text().split()[1]
    assert key in known_hosts.read_text()
    # strict checking now passes with the recorded key
    assert "unknown job id" in cli("jobs", "987654").stderr


def test_changed_host_key_is_refused_even_when_accepting_new_keys(
    kind: str, tmp_path: Path, isolated_home: Path, login: dict[str, Any]
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, timeout=30
    )
    port = login["port"]
    wrong = Path(f"{other}.pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(wrong)}\n")
    config = isolated_home / "config.toml"
    config.write_text(config.read_text() + f'known_hosts = "{known_hosts}"\n')
    for extra in ((), ("--accept-new-host-key",)):
        refused = cli("jobs", "987654", *extra)
        assert refused.exit_code == 1
        assert "changed" in refused.stderr.lower()
        assert "Traceback" not in refused.output


def test_refused_key_is_an_authentication_error(
    kind: str, tmp_path: Path, isolated_home: Path, login: dict[str, Any]
) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True, timeout=30
    )
    ssh = login
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        f"Host stranger\n  HostName {ssh['host']}\n  Port {ssh['port']}\n  User {ssh['user']}\n"
        f"  IdentityFile {stranger}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {ssh['known_hosts']}\n"
    )
    config = isolated_home / "config.toml"
    text = config.read_text().replace(f'host = "{ssh["alias"]}"', 'host = "stranger"')
    text = text.replace(ssh["ssh_config"], str(ssh_config))
    config.write_text(text)
    refused = cli("jobs", "987654")
    assert refused.exit_code == 1
    assert "refused" in refused.stderr.lower()
    assert str(stranger) in refused.stderr
    assert "Traceback" not in refused.output


def test_a_hand_written_script_over_ssh_needs_a_work_folder(kind: str, tmp_path: Path) -> None:
    script = tmp_path / "mine.sh"
    script.write_text("#!/bin/bash\necho from-my-script\n")
    refused = cli("submit", str(script))
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        f"hpcbridge: error: {script} was not rendered by hpcbridge, so it has no work folder "
        "(pass --work DIR (an absolute folder on the login node to copy it into))"
    )
    work = tmp_path / "remote-work"
    job_id = submit(script, "--work", str(work))
    assert (work / "mine.sh").read_text() == script.read_text()  # copied by SFTP
    waited = cli("jobs", job_id, "--wait", *WAIT)
    assert waited.exit_code == 0, waited.output
    assert job_record(job_id)["state"] == "finished"
