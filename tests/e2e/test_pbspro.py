"""PBS Pro as the real server does it (issue 16 item 2): OpenPBS on loopback, driven over SSH as
its non-root user through hpcbridge's own PbsScheduler, and checked against the server itself
(``qstat -x -f -F json ID`` run here, as root).

What a user cares about: the project, queue and resources they asked for reach the server; every
way a job ends (finished, failed, killed for walltime, deleted queued or running, deleted by the
server because its afterok parent failed) is told apart and explained; arrays and dependencies
behave; ``cancel`` says the right thing for live, ended and unknown ids; and the two forms of
``qstat`` the product reads (JSON for one id, text for several) agree. Within a test,
independent jobs run side by side (the node has 2 cpus); the module takes about 90 s, a third
of it the walltime kill. The cancel and array tests pin bugs the real server showed (qdel of
several ids deletes none when one fails; a failed array ends with Exit_status 0).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.jobs import open_scheduler, open_transport
from hpcbridge.schedulers import pbs_commands
from hpcbridge.schedulers.base import JobStatus, State, explain_kill
from hpcbridge.schedulers.pbs import PbsScheduler

pytestmark = [
    pytest.mark.e2e,
    # The `kind` fixture's PBS Pro profile only: ssh to pbsuser, scheduler "pbs", PTV000.
    pytest.mark.parametrize("kind", ["pbspro"], indirect=True),
]

#: Generous bounds: a full test run may share the server's two cpus with these jobs.
LIMIT = 240.0
WAIT = ("--interval", "0.5", "--timeout", str(int(LIMIT)))
UNKNOWN = "987654.vm"
WALLTIME_KILL = explain_kill(
    JobStatus(
        native_id="", state=State.FAILED, raw_state="F", killed_by="walltime", limit="00:00:05"
    )
)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def recipe(
    folder: Path,
    name: str,
    command: str,
    *,
    walltime: str = "00:05:00",
    memory: str = "100MB",
    extra: str = "",
) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\ndescription = "PBS Pro e2e job {name}"\n'
        f'[run]\ncommand = """\n{command}\n"""\n'
        f'[resources]\nmemory = "{memory}"\nwalltime = "{walltime}"\n{extra}'
    )


def render(tmp: Path, name: str, command: str, **resources: str) -> Path:
    """Write recipe ``name`` and render it for PBS into tmp/name/job.sh."""
    recipes = tmp / "recipes"
    recipe(recipes, name, command, **resources)
    base = tmp / name
    (base / "in").mkdir(parents=True)
    script = base / "job.sh"
    rendered = cli(
        "render", name, "--recipes", str(recipes), "--scheduler", "pbs",
        "--input", str(base / "in"), "--output", str(base / "out"), "--name", name,
        "-o", str(script),
    )  # fmt: skip
    assert rendered.exit_code == 0, rendered.output
    return script


def hand_written(folder: Path, body: str) -> Path:
    """A script hpcbridge did not render: no status files, no ``#PBS -P``; its logs go to
    ``folder`` (not to pbsuser's home, where PBS puts them by default)."""
    folder.mkdir()
    script = folder / "mine.sh"
    script.write_text(
        "#!/bin/bash\n#PBS -l select=1:ncpus=1:mem=100mb\n#PBS -l walltime=00:01:00\n"
        f"#PBS -o {folder}/mine.out\n#PBS -e {folder}/mine.err\n{body}\n"
    )
    return script


def submit(script: Path, *extra: str) -> str:
    result = cli("submit", str(script), *extra)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert re.fullmatch(r"\d+(\[\])?\.vm", job_id), result.stdout  # PBS Pro names its server
    return job_id


def record(job_id: str) -> dict[str, Any]:
    """The job as `hpcbridge jobs ID` shows it, after one poll."""
    result = cli("--json", "jobs", job_id)
    assert result.exit_code == 0, result.output
    (job,) = json.loads(result.stdout)
    return job


def wait_all(*ids: str) -> Result:
    return cli("jobs", *ids, "--wait", *WAIT)


def server(job_id: str, *, subjobs: bool = False) -> dict[str, Any]:
    """The server's own record of one job (`qstat -x -f -F json`, run here as root)."""
    argv = ["/opt/pbs/bin/qstat", "-x", "-f", "-F", "json", *(["-t"] if subjobs else []), job_id]
    listed = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    jobs: dict[str, Any] = json.loads(listed.stdout).get("Jobs", {})
    return jobs if subjobs else jobs[job_id]


def wait_until(predicate: Callable[[], Any], what: str, limit: float = LIMIT) -> Any:
    deadline = time.monotonic() + limit
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {limit:g} s waiting for {what}")
        time.sleep(0.5)
    return value


def server_state(job_id: str, letters: str) -> Callable[[], bool]:
    return lambda: server(job_id)["job_state"] in letters


@pytest.fixture()
def scheduler(kind: str, pbspro_cluster: dict[str, Any]) -> Iterator[PbsScheduler]:
    """The profile's PbsScheduler over its own SSH connection (flavour asked of the server)."""
    settings = load_settings()
    transport = open_transport(settings)
    opened = open_scheduler(settings, transport)
    assert isinstance(opened, PbsScheduler)
    try:
        yield opened
    finally:
        transport.close()


def json_and_text(scheduler: PbsScheduler, ids: list[str]) -> tuple[dict, dict]:
    """The same jobs read from `qstat -x -f -F json ID` one at a time and from one
    `qstat -x -f A B C` in text."""
    run = scheduler.transport.run
    one_by_one: dict[str, JobStatus] = {}
    for job_id in ids:
        result = run(
            pbs_commands.status_argv([job_id], flavour="pbspro", json_output=True), timeout=30
        )
        assert result.ok, result.said()
        one_by_one.update(pbs_commands.parse_qstat_json(result.stdout))
    result = run(pbs_commands.status_argv(ids, flavour="pbspro"), timeout=30)
    assert result.ok, result.said()
    return one_by_one, pbs_commands.parse_qstat_full(result.stdout)


def test_flavour_is_read_from_qstat_version_over_ssh(
    kind: str, pbspro_cluster: dict[str, Any], scheduler: PbsScheduler
) -> None:
    said = scheduler.transport.run(["qstat", "--version"], timeout=30)
    # pbsuser's login puts /opt/pbs/bin first: this is OpenPBS, not a Slurm wrapper
    assert said.stdout.strip() == f"pbs_version = {pbspro_cluster['pbs']['version']}"
    assert PbsScheduler(scheduler.transport).flavour == "pbspro"  # no flavour in the profile
    assert (scheduler.flavour, scheduler.template) == ("pbspro", "pbs")


def test_project_queue_resources_and_log_paths_reach_the_server(
    kind: str, pbspro_cluster: dict[str, Any], tmp_path: Path, scheduler_queue: Any
) -> None:
    # The recipe names its own project and queue; the other job takes the profile's project
    # (PTV000) and the server's default queue.
    own = render(
        tmp_path, "own", "echo to-stdout; echo to-stderr >&2",
        walltime="00:02:00", extra='queue = "dtq"\naccount = "PTV042"\n',
    )  # fmt: skip
    plain = render(tmp_path, "plain", "echo plain", memory="150MB")
    # a script of the user's own, with no #PBS -P: the profile's project goes on qsub's line
    mine = hand_written(tmp_path / "mine", "echo mine")
    own_id, plain_id = submit(own), submit(plain)
    mine_id = submit(mine, "--work", str(tmp_path / "work"))
    waited = wait_all(own_id, plain_id, mine_id)
    assert waited.exit_code == 0, waited.output

    job = server(own_id)
    assert (job["project"], job["queue"], job["Exit_status"]) == ("PTV042", "dtq", 0)
    resources = job["Resource_List"]
    assert resources["select"] == "1:ncpus=1:mem=100mb"
    assert (resources["ncpus"], resources["mem"], resources["walltime"]) == (1, "100mb", "00:02:00")
    logs = tmp_path / "own" / ".hpcbridge"
    # PBS names paths with the submitting host: localhost is 127.0.0.1's name here
    assert job["Output_Path"] == f"localhost:{logs / 'job.out'}"
    assert job["Error_Path"] == f"localhost:{logs / 'job.err'}"
    # delivered by the time hpcbridge calls the job ended
    assert (logs / "job.out").read_text() == "to-stdout\n"
    assert "to-stderr" in (logs / "job.err").read_text()
    assert record(own_id)["stdout"] == str(logs / "job.out")

    job = server(plain_id)
    assert (job["project"], job["queue"]) == ("PTV000", "workq")
    assert job["Resource_List"]["select"] == "1:ncpus=1:mem=150mb"
    assert job["Resource_List"]["walltime"] == "00:05:00"
    assert (tmp_path / "plain" / ".hpcbridge" / "job.out").read_text() == "plain\n"

    job = server(mine_id)
    assert (job["project"], job["Exit_status"]) == ("PTV000", 0)
    assert job["Submit_arguments"] == f"-P PTV000 {tmp_path}/work/mine.sh"
    assert (tmp_path / "mine" / "mine.out").read_text() == "mine\n"
    assert record(mine_id)["state"] == "finished"


def test_running_finished_failed_and_walltime_kill(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    ids = {
        "killed": submit(render(tmp_path, "killed", "sleep 120", walltime="00:00:05")),
        "ok": submit(render(tmp_path, "ok", "echo fine")),
        "bad": submit(render(tmp_path, "bad", 'echo "boom: exit 3" >&2\nexit 3')),
    }
    started = tmp_path / "killed" / ".hpcbridge" / "started.json"
    wait_until(lambda: started.is_file() and record(ids["killed"])["state"] == "running", "R")
    assert server(ids["killed"])["job_state"] == "R"
    running = scheduler.status([ids["killed"]])[ids["killed"]]
    assert (running.state, running.raw_state, running.exit_code) == (State.RUNNING, "R", None)

    waited = wait_all(*ids.values())
    assert waited.exit_code == 3, waited.output  # not every job succeeded
    ok, bad, killed = (record(ids[n]) for n in ("ok", "bad", "killed"))
    assert (ok["state"], ok["exit_code"], ok["reason"]) == ("finished", 0, "")
    assert (bad["state"], bad["exit_code"], bad["reason"]) == ("failed", 3, "exit code 3")
    assert "boom: exit 3" in bad["log_tail"]
    # the script's trap saw SIGTERM (143); the server says why it was sent
    assert (killed["state"], killed["exit_code"]) == ("failed", 143)
    assert killed["reason"] == WALLTIME_KILL
    assert killed["reason"].startswith("killed: walltime 00:00:05 exceeded; raise walltime")
    assert f"({WALLTIME_KILL})" in waited.stderr  # the progress line says it too
    assert "job killed: walltime" in killed["log_tail"]  # the mom's note in the job's stderr

    on_server = {n: server(i) for n, i in ids.items()}
    assert {n: j["Exit_status"] for n, j in on_server.items()} == {"ok": 0, "bad": 3, "killed": -29}
    assert on_server["killed"]["comment"].endswith("exceeded resource walltime")
    assert on_server["killed"]["Resource_List"]["walltime"] == "00:00:05"

    # The scheduler's own answer, through both forms of qstat the product reads
    statuses = scheduler.status(list(ids.values()))
    assert statuses[ids["killed"]].state is State.FAILED
    assert (statuses[ids["killed"]].killed_by, statuses[ids["killed"]].limit) == (
        "walltime",
        "00:00:05",
    )
    assert explain_kill(statuses[ids["killed"]]) == WALLTIME_KILL
    assert (statuses[ids["bad"]].state, statuses[ids["bad"]].exit_code) == (State.FAILED, 3)
    assert (statuses[ids["ok"]].state, statuses[ids["ok"]].exit_code) == (State.FINISHED, 0)
    one_by_one, together = json_and_text(scheduler, list(ids.values()))
    assert one_by_one == together == statuses


def test_deleted_while_queued_and_while_running(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    # More memory than the node has: accepted, then queued forever ("Can Never Run").
    queued = submit(render(tmp_path, "queued", "echo never", memory="60TB"))
    running = submit(render(tmp_path, "running", "sleep 300"))
    started = tmp_path / "running" / ".hpcbridge" / "started.json"
    wait_until(started.is_file, "the sleeper to start")
    assert (record(queued)["state"], record(queued)["raw_state"]) == ("queued", "Q")
    assert record(running)["state"] == "running"
    # deleted by the user from their own shell on the login node, not through hpcbridge
    deleted = scheduler.transport.run(["qdel", queued, running], timeout=30)
    assert deleted.ok, deleted.said()
    wait_until(lambda: server_state(queued, "F")() and server_state(running, "F")(), "F")
    never, killed = server(queued), server(running)
    assert "Exit_status" not in never  # it never ran
    assert (killed["Exit_status"], killed["substate"]) == (271, 91)  # 256 + SIGTERM
    assert killed["comment"].endswith("terminated by pbsuser@localhost")

    statuses = scheduler.status([queued, running])
    assert statuses[queued].state is State.CANCELLED
    assert statuses[running].state is State.CANCELLED
    assert statuses[running].reason == "deleted by pbsuser@localhost"
    assert explain_kill(statuses[running]) == "killed by signal 15 (SIGTERM)"
    one_by_one, together = json_and_text(scheduler, [queued, running])
    assert one_by_one == together == statuses

    waited = wait_all(queued, running)
    assert waited.exit_code == 3, waited.output
    gone = record(queued)
    assert gone["state"] == "cancelled" and gone["exit_code"] is None
    # the server's last comment on it, which the deletion ended with "and terminated"
    assert gone["reason"] == never["comment"]
    assert gone["reason"].startswith("Can Never Run: Insufficient amount of resource: mem")
    assert gone["reason"].endswith("and terminated")
    stopped = record(running)
    assert stopped["reason"] == "deleted by pbsuser@localhost: killed by signal 15 (SIGTERM)"
    # deleted, not failed: its script's 143 is the SIGTERM of the deletion
    assert (stopped["state"], stopped["exit_code"]) == ("cancelled", 143)


def test_afterok_held_then_run_or_deleted_by_the_server(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    good = submit(render(tmp_path, "good", "sleep 10"))
    after_good = submit(render(tmp_path, "after_good", "echo child"), "--after", good)
    failing = submit(render(tmp_path, "failing", "sleep 2\nexit 3"))
    after_failing = submit(render(tmp_path, "after_failing", "echo never"), "--after", failing)

    # While its parent runs, the child is held by the server (H, a system hold)
    wait_until(server_state(good, "R"), f"{good} to run")
    held = server(after_good)
    assert (held["job_state"], held["Hold_Types"]) == ("H", "s")
    shown = record(after_good)
    assert (shown["state"], shown["raw_state"]) == ("held", "H")
    assert scheduler.status([after_good])[after_good].state is State.HELD

    # PBS Pro deletes the child of the failed parent by itself: F, and no Exit_status
    wait_until(server_state(after_failing, "F"), f"the server to end {after_failing}")
    orphan = server(after_failing)
    assert "Exit_status" not in orphan
    assert server(failing)["Exit_status"] == 3
    status = scheduler.status([after_failing])[after_failing]
    assert (status.state, status.reason) == (State.CANCELLED, pbs_commands.NEVER_RAN)

    waited = wait_all(good, after_good, failing, after_failing)
    assert waited.exit_code == 3, waited.output
    states = {i: record(i) for i in (good, after_good, failing, after_failing)}
    assert [states[i]["state"] for i in (good, after_good, failing, after_failing)] == [
        "finished",
        "finished",
        "failed",
        "cancelled",
    ]
    assert states[after_failing]["reason"] == pbs_commands.NEVER_RAN
    assert server(after_good)["Exit_status"] == 0
    # the child started only after its parent ended
    parent_end = json.loads((tmp_path / "good/.hpcbridge/status.json").read_text())["end"]
    child = json.loads((tmp_path / "after_good/.hpcbridge/started.json").read_text())
    assert child["start"] >= parent_end
    assert not (tmp_path / "after_failing/.hpcbridge/started.json").exists()


def test_array_with_a_failing_subjob(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    command = 'sleep 3\nif [ "$PBS_ARRAY_INDEX" = 2 ]; then echo "task 2 fails" >&2; exit 3; fi'
    array = submit(render(tmp_path, "array", command), "--array", "1-3")
    assert array.endswith("[].vm")
    wait_until(server_state(array, "B"), f"{array} to begin")
    live = scheduler.status([array])[array]
    assert (live.state, live.raw_state) == (State.RUNNING, "B")

    waited = wait_all(array)
    assert waited.exit_code == 3, waited.output
    shown = record(array)
    assert (shown["state"], shown["exit_code"], shown["array"]) == ("failed", 3, "1-3")
    state_dir = tmp_path / "array" / ".hpcbridge"
    codes = {
        i: json.loads((state_dir / f"status.{i}.json").read_text())["exit_code"] for i in (1, 2, 3)
    }
    assert codes == {1: 0, 2: 3, 3: 0}

    number = array.split("[")[0]
    subjobs = server(array, subjobs=True)
    exits = {k: v.get("Exit_status") for k, v in subjobs.items() if k != array}
    assert exits == {f"{number}[1].vm": 0, f"{number}[2].vm": 3, f"{number}[3].vm": 0}
    # the server's own word on the array: F, substate 93 (failed), yet Exit_status 0
    parent = subjobs[array]
    assert (parent["job_state"], parent["substate"], parent["Exit_status"]) == ("F", 93, 0)
    assert parent["comment"].endswith("and failed")
    # one answer for the array, keyed by the id hpcbridge was given; subjobs by theirs
    statuses = scheduler.status([array, f"{number}[2].vm"])
    assert set(statuses) == {array, f"{number}[2].vm"}
    assert statuses[array].state.is_final
    assert (statuses[f"{number}[2].vm"].state, statuses[f"{number}[2].vm"].exit_code) == (
        State.FAILED,
        3,
    )
    one_by_one, together = json_and_text(scheduler, [array, f"{number}[2].vm"])
    assert one_by_one == together == statuses


def test_array_of_a_hand_written_script_with_a_failing_subjob(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    script = hand_written(tmp_path / "mine", '[ "$PBS_ARRAY_INDEX" = 2 ] && exit 3\nexit 0')
    array = submit(script, "--work", str(tmp_path / "work"), "--array", "1-3")
    wait_all(array)
    number = array.split("[")[0]
    assert server(f"{number}[2].vm")["Exit_status"] == 3
    assert record(array)["state"] == "failed"  # what the user sees
    assert scheduler.status([array])[array].state is State.FAILED


def test_cancel_running_finished_and_unknown_ids(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    sleeper = submit(render(tmp_path, "sleeper", "sleep 300"))
    by_cli = submit(render(tmp_path, "by_cli", "sleep 300"))
    done = submit(render(tmp_path, "done", "echo done"))
    wait_until(server_state(sleeper, "R"), f"{sleeper} to run")

    # PbsScheduler.cancel returns the ids the server did not know
    assert scheduler.cancel([sleeper]) == []  # running: qdel accepted it
    wait_until(server_state(sleeper, "F"), f"{sleeper} to end after qdel")
    assert server(sleeper)["Exit_status"] == 271
    assert scheduler.cancel([sleeper]) == []  # ended: "Job has finished", nothing to cancel
    assert scheduler.cancel([UNKNOWN]) == [UNKNOWN]  # "Unknown Job Id"
    assert scheduler.cancel(["987654"]) == ["987654"]  # the server adds its name; still unknown

    # What a user sees
    wait_until(server_state(by_cli, "R"), f"{by_cli} to run")
    cancelled = cli("cancel", by_cli)
    assert (cancelled.exit_code, cancelled.stdout) == (0, f"{by_cli}: cancelled\n")
    wait_until(server_state(by_cli, "F"), f"{by_cli} to end after `hpcbridge cancel`")
    assert record(by_cli)["state"] == "cancelled"
    assert wait_all(done).exit_code == 0
    assert scheduler.cancel([done]) == []
    ended = cli("cancel", done)
    assert (ended.exit_code, ended.stdout) == (0, f"{done}: finished\n")  # left as it ended
    assert (record(done)["state"], record(done)["exit_code"]) == ("finished", 0)
    unknown = cli("cancel", UNKNOWN)
    assert unknown.exit_code == 1
    assert f"unknown job id(s): {UNKNOWN}" in unknown.stderr


def test_cancel_of_a_job_that_ended_since_the_last_poll(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    done = submit(render(tmp_path, "done", "echo done"))
    wait_until(server_state(done, "F"), f"{done} to end")
    assert server(done)["Exit_status"] == 0
    ended = cli("cancel", done)
    assert (ended.exit_code, ended.stdout) == (0, f"{done}: finished\n")


def test_cancel_of_a_finished_and_an_unknown_id_together(
    kind: str,
    pbspro_cluster: dict[str, Any],
    tmp_path: Path,
    scheduler: PbsScheduler,
    scheduler_queue: Any,
) -> None:
    done = submit(render(tmp_path, "done", "echo done"))
    sleeper = submit(render(tmp_path, "sleeper", "sleep 300"))
    assert wait_all(done).exit_code == 0
    assert scheduler.cancel([done, UNKNOWN]) == [UNKNOWN]
    # `qdel A 9999.vm B` deletes neither A nor B on this server: the live job must still go
    wait_until(server_state(sleeper, "R"), f"{sleeper} to run")
    assert scheduler.cancel([sleeper, UNKNOWN]) == [UNKNOWN]
    wait_until(server_state(sleeper, "F"), f"{sleeper} to end after qdel")
    assert server(sleeper)["Exit_status"] == 271
