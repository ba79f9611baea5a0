"""Fixtures shared by the end-to-end tests: a profile that submits over SSH to the CI cluster
(qsub through Slurm's PBS wrappers, or sbatch), the sandbox XNAT for whole runs, and the
scheduler's own view of the jobs a test submitted (cancelled by id at teardown)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(params=["pbs", "slurm"])
def kind(request: pytest.FixtureRequest, cluster: dict[str, Any], isolated_home: Path) -> str:
    """A profile `ci` submitting over SSH to qsub (the PBS wrappers) or to sbatch."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "config.toml").write_text(
        'default_profile = "ci"\n\n[profiles.ci]\n'
        f'host = "{cluster["ssh"]["alias"]}"\n'
        f'ssh_config = "{cluster["ssh"]["ssh_config"]}"\n'
        f'scheduler = "{request.param}"\n'
        "poll_interval = 0.3\n"
    )
    return str(request.param)


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
class SlurmJob:
    """One job as Slurm itself lists it (`squeue -t all` keeps ended jobs for MinJobAge)."""

    id: str
    name: str
    state: str
    script: str


class SlurmQueue:
    """What the scheduler was given, read with squeue rather than through hpcbridge: a job
    submitted twice shows up here even when hpcbridge lost track of one of them."""

    def all(self) -> list[SlurmJob]:
        listed = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%o"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        jobs = []
        for line in listed.stdout.splitlines():
            job_id, name, state, script = line.strip().split("|", 3)
            jobs.append(SlurmJob(job_id, name, state, script))
        return sorted(jobs, key=lambda j: int(j.id.split("_")[0]))

    def under(self, folder: Path) -> list[SlurmJob]:
        """The jobs whose script lies below ``folder`` (rendered scripts live in their work
        folder, so this is a test's own jobs, whatever else runs on the cluster)."""
        prefix = f"{folder}/"
        return [j for j in self.all() if j.script.startswith(prefix)]

    def cancel_live_under(self, folder: Path) -> list[str]:
        live = [j.id for j in self.under(folder) if j.state not in ENDED]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=30)
        return live


@pytest.fixture()
def slurm_queue(cluster: dict[str, Any], tmp_path: Path) -> Iterator[SlurmQueue]:
    """Slurm's view of the jobs; at teardown, this test's jobs still queued or running are
    cancelled (by id), so a failed test leaves nothing behind on the cluster."""
    if shutil.which("squeue") is None:
        pytest.fail("squeue is not installed, but the test cluster is up")
    queue = SlurmQueue()
    yield queue
    queue.cancel_live_under(tmp_path)
