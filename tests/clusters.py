"""Fixtures of the scenarios that run on every scheduler: a profile that submits to the local
scheduler or over SSH to a CI cluster (qsub through Slurm's PBS wrappers, sbatch, or qsub on
real PBS Pro as a non-root user), the sandbox XNAT for whole runs, and the scheduler's own view
of the jobs a test submitted (cancelled by id at teardown). tests/conftest.py imports the
fixtures, so that tests/integration and tests/e2e both reach them."""

from __future__ import annotations

import grp
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hpcbridge.schedulers.local import LocalScheduler

#: Slurm states of jobs that have left the queue for good.
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


#: The scheduler flavours every e2e scenario runs on: Slurm's PBS wrappers, Slurm itself, and
#: real PBS Pro (OpenPBS). The first two share one cluster; PBS Pro has its own.
KINDS = ["pbs", "slurm", "pbspro"]


def on(*kinds: str) -> list[Any]:
    """Parameters for a scenario written once for several schedulers: the local one runs
    everywhere; the cluster kinds are e2e and skip without their cluster (except under
    CI=true). Use with ``@pytest.mark.parametrize("kind", on(...), indirect=True)``."""
    return [k if k == "local" else pytest.param(k, marks=pytest.mark.e2e) for k in kinds]


EVERY_SCHEDULER = on("local", *KINDS)

#: Local job states (hpcbridge/schedulers/local.py) in Slurm's words, as SchedulerJob has them.
LOCAL_STATES = {
    "queued": "PENDING",
    "running": "RUNNING",
    "finished": "COMPLETED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
}


def scheduler_of(kind: str) -> str:
    """The profile's ``scheduler`` for a test flavour: PBS Pro is ``pbs``, like the wrappers."""
    return "pbs" if kind == "pbspro" else kind


def is_job_id(kind: str, text: str) -> bool:
    """A job id as this flavour prints it: ``65`` from Slurm and its wrappers, ``65.vm`` from
    PBS Pro (the server's name after the number)."""
    number, _, server = text.partition(".")
    return number.isdigit() and (bool(server) if kind == "pbspro" else not server)


@pytest.fixture()
def tmp_path(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """pytest's tmp_path, except on PBS Pro, whose jobs run as the cluster's own user: there it
    is a folder shared the way a lab shares a group folder (the cluster's group, setgid), in the
    cluster's folder. Not below /tmp/pytest-of-root: pytest makes that 0700 again whenever any
    session starts, which cut running jobs off their work folders (seen: "cp: cannot stat").
    """
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("kind") != "pbspro":
        yield tmp_path
        return
    pbspro = request.getfixturevalue("pbspro_cluster")
    shared = Path(pbspro["dir"]) / "shared"
    shared.mkdir(mode=0o755, exist_ok=True)
    # (paths in scheduler directives take letters, digits and _.-/+@ only)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared))
    os.chown(folder, -1, grp.getgrnam(pbspro["pbs"]["group"]).gr_gid)
    folder.chmod(0o2775)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, isolated_home: Path, tmp_path: Path) -> Iterator[str]:
    """A profile `ci` submitting to the local scheduler, or over SSH to qsub (the PBS wrappers),
    to sbatch, or to qsub on PBS Pro (as its non-root user, with a project, as Artemis
    requires)."""
    flavour = str(request.param)
    umask = None
    if flavour == "local":
        where, extra = None, ""
    elif flavour == "pbspro":
        pbspro = request.getfixturevalue("pbspro_cluster")
        umask = os.umask(0o002)  # what the test writes stays writable for the group
        where, extra = pbspro["ssh"], 'account = "PTV000"\n'
    else:
        where, extra = request.getfixturevalue("cluster")["ssh"], ""
    isolated_home.mkdir(parents=True, exist_ok=True)
    login = f'host = "{where["alias"]}"\nssh_config = "{where["ssh_config"]}"\n' if where else ""
    (isolated_home / "config.toml").write_text(
        'default_profile = "ci"\n\n[profiles.ci]\n'
        + login
        + f'scheduler = "{scheduler_of(flavour)}"\n'
        "poll_interval = 0.3\n" + extra
    )
    yield flavour
    if umask is not None:
        os.umask(umask)


@pytest.fixture()
def login(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `ssh` part of the cluster.json of the cluster this flavour submits to."""
    name = "pbspro_cluster" if kind == "pbspro" else "cluster"
    ssh: dict[str, Any] = request.getfixturevalue(name)["ssh"]
    return ssh


@pytest.fixture()
def chain_settings(kind: str, request: pytest.FixtureRequest) -> str:
    """The profile lines a chain needs on this flavour's cluster: a transfer queue whose nodes
    may reach XNAT (PBS Pro's `dtq`, as on Artemis; Slurm's one partition otherwise), and the
    command its transfer jobs run: this checkout's hpcbridge. PBS Pro's user cannot read this
    process's python, so it gets the cluster's python with a copy of this checkout's code on
    PYTHONPATH."""
    import sys

    if kind == "local":
        return ""  # the local scheduler's defaults: this Python's hpcbridge, no queues
    if kind != "pbspro":
        bridge = shlex.join([sys.executable, "-m", "hpcbridge"])
        queue = "batch"
    else:
        pbspro = request.getfixturevalue("pbspro_cluster")
        # A copy in the test's shared folder: the checkout itself may lie where that user
        # cannot read (a clone under /root, say).
        checkout = Path(__file__).resolve().parents[1]
        code = request.getfixturevalue("tmp_path") / "hpcbridge-code"
        for package in ("hpcbridge", "templates"):
            shutil.copytree(
                checkout / package, code / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        bridge = shlex.join(
            ["env", f"PYTHONPATH={code}", pbspro["pbs"]["python"], "-m", "hpcbridge"]
        )
        queue = pbspro["pbs"]["transfer_queue"]
    return f"bridge_command = {json.dumps(bridge)}\ntransfer_queue = {json.dumps(queue)}\n"


@pytest.fixture()
def run_profile(
    kind: str, sandbox: Any, tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The ci profile plus the sandbox XNAT and a work_root on the cluster's side."""
    work_root = tmp_path / "cluster-work"
    config = isolated_home / "config.toml"
    config.write_text(config.read_text() + f'work_root = "{work_root}"\n')
    monkeypatch.setenv("HPCBRIDGE_XNAT", sandbox.url)
    monkeypatch.setenv("HPCBRIDGE_USER", sandbox.user)
    monkeypatch.setenv("HPCBRIDGE_PASSWORD", sandbox.password)
    return work_root


@dataclass(frozen=True)
class SchedulerJob:
    """One job as the scheduler itself lists it, its state in Slurm's words (PENDING, RUNNING,
    COMPLETED, FAILED, CANCELLED) whichever scheduler ran it, so one assertion fits all."""

    id: str
    name: str
    state: str
    script: str


class SchedulerQueue:
    """What the scheduler was given, read with its own tools rather than through hpcbridge: a
    job submitted twice shows up here even when hpcbridge lost track of one of them."""

    def all(self) -> list[SchedulerJob]:
        raise NotImplementedError

    def cancel(self, ids: list[str]) -> None:
        raise NotImplementedError

    def under(self, folder: Path) -> list[SchedulerJob]:
        """The jobs whose script lies below ``folder`` (rendered scripts live in their work
        folder, so this is a test's own jobs, whatever else runs on the cluster)."""
        prefix = f"{folder}/"
        return [j for j in self.all() if j.script.startswith(prefix)]

    def cancel_live_under(self, folder: Path) -> list[str]:
        live = [j.id for j in self.under(folder) if j.state not in ENDED]
        if live:
            self.cancel(live)
        return live


class SlurmQueue(SchedulerQueue):
    """Slurm's view (`squeue -t all` keeps ended jobs for MinJobAge)."""

    def all(self) -> list[SchedulerJob]:
        listed = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%o"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        jobs = []
        for line in listed.stdout.splitlines():
            job_id, name, state, script = line.strip().split("|", 3)
            jobs.append(SchedulerJob(job_id, name, state, script))
        return sorted(jobs, key=lambda j: int(j.id.split("_")[0]))

    def cancel(self, ids: list[str]) -> None:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


class PbsProQueue(SchedulerQueue):
    """PBS Pro's view: `qstat -x -f -F json` lists live jobs and its job history."""

    def __init__(self, prefix: str) -> None:
        self.bin = Path(prefix) / "bin"

    def all(self) -> list[SchedulerJob]:
        listed = subprocess.run(
            [str(self.bin / "qstat"), "-x", "-f", "-F", "json"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        jobs = []
        for job_id, fields in json.loads(listed.stdout).get("Jobs", {}).items():
            # qsub's own argv ends with the script's path
            script = shlex.split(fields.get("Submit_arguments", ""))[-1:] or [""]
            jobs.append(SchedulerJob(job_id, fields["Job_Name"], self._state(fields), script[0]))
        return sorted(jobs, key=lambda j: int(j.id.split(".")[0].split("[")[0]))

    @staticmethod
    def _state(fields: dict[str, Any]) -> str:
        letter = fields["job_state"]
        if letter in "QHWT":
            return "PENDING"
        if letter not in "FX":
            return "RUNNING"
        if "Exit_status" not in fields:
            return "CANCELLED"  # never ran: deleted, or its afterok parent failed
        return "COMPLETED" if fields["Exit_status"] == 0 else "FAILED"

    def cancel(self, ids: list[str]) -> None:
        subprocess.run([str(self.bin / "qdel"), *ids], capture_output=True, timeout=30)


class LocalQueue(SchedulerQueue):
    """The local scheduler's view: what each job folder's job.json and state.json hold."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def all(self) -> list[SchedulerJob]:
        jobs = []
        for spec_file in self.root.glob("*/job.json"):
            spec = json.loads(spec_file.read_text())
            state_file = spec_file.parent / "state.json"
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            jobs.append(
                SchedulerJob(
                    spec_file.parent.name,
                    spec["name"],
                    LOCAL_STATES[state.get("state", "queued")],
                    spec["script"],
                )
            )
        return sorted(jobs, key=lambda j: int(j.id))

    def cancel(self, ids: list[str]) -> None:
        LocalScheduler(self.root).cancel(ids)


@pytest.fixture()
def scheduler_queue(
    kind: str, tmp_path: Path, isolated_home: Path, request: pytest.FixtureRequest
) -> Iterator[SchedulerQueue]:
    """The scheduler's view of the jobs; at teardown, this test's jobs still queued or running
    are cancelled (by id), so a failed test leaves nothing behind on the cluster."""
    queue: SchedulerQueue
    if kind == "local":
        queue = LocalQueue(isolated_home / "local-jobs")
    elif kind == "pbspro":
        queue = PbsProQueue(request.getfixturevalue("pbspro_cluster")["pbs"]["prefix"])
    else:
        if shutil.which("squeue") is None:
            pytest.fail("squeue is not installed, but the test cluster is up")
        queue = SlurmQueue()
    yield queue
    queue.cancel_live_under(tmp_path)
