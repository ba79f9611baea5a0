"""Shared fixtures: an isolated HPCBRIDGE_HOME for every test, sandbox servers on loopback, the
CI clusters, and (from clusters.py) a profile for each scheduler a scenario runs on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from hpcbridge.sandbox import AuthSettings, SandboxServer

# Fixtures of the scenarios run on every scheduler, and of the job-environment tests.
pytest_plugins = ["clusters", "jobenv"]

IN_CI = os.environ.get("CI", "").lower() == "true"
# Read at import: the isolated_home fixture clears HPCBRIDGE_* variables for every test.
CLUSTER_JSON = Path(
    os.environ.get("HPCBRIDGE_TEST_CLUSTER", "/tmp/hpcbridge-ci-cluster/cluster.json")
)
PBSPRO_JSON = Path(
    os.environ.get("HPCBRIDGE_TEST_PBS_CLUSTER", "/tmp/hpcbridge-ci-pbs/cluster.json")
)


def _missing(message: str) -> None:
    """Skip, except under CI=true, where .ci/run must have provided the service."""
    if IN_CI:
        pytest.fail(f"{message}, but CI=true requires it (.ci/run sets it up)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def cluster() -> dict[str, Any]:
    """The single-node Slurm (with PBS wrappers) and sshd that tests/cluster/up.sh started."""
    if not CLUSTER_JSON.is_file():
        _missing(
            f"no test cluster ({CLUSTER_JSON} is missing): run `bash tests/cluster/up.sh` as "
            "root, see tests/cluster/README.md"
        )
    data: dict[str, Any] = json.loads(CLUSTER_JSON.read_text())
    try:
        idle = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        idle = str(exc)
    if not any(s in idle for s in ("idle", "mix", "alloc")):
        _missing(
            f"the test cluster is not up (sinfo says {idle.strip()!r}): rerun tests/cluster/up.sh"
        )
    return data


@pytest.fixture(scope="session")
def pbspro_cluster() -> dict[str, Any]:
    """The single-node OpenPBS (real PBS Pro) and its sshd that tests/cluster/pbs-up.sh started."""
    if not PBSPRO_JSON.is_file():
        _missing(
            f"no PBS Pro test cluster ({PBSPRO_JSON} is missing): run `bash "
            "tests/cluster/pbs-up.sh` as root; it builds OpenPBS from its source tarball "
            "(--tarball FILE, $HPCBRIDGE_OPENPBS_TARBALL or ../shared/openpbs/), see "
            "tests/cluster/README.md"
        )
    data: dict[str, Any] = json.loads(PBSPRO_JSON.read_text())
    qstat = Path(data["pbs"]["prefix"]) / "bin" / "qstat"
    try:
        server = subprocess.run([str(qstat), "-B"], capture_output=True, text=True, timeout=20)
        said = (server.stdout + server.stderr).strip()
        up = server.returncode == 0 and "Active" in server.stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        said, up = str(exc), False
    if not up:
        _missing(f"the PBS Pro server is not up (qstat -B says {said!r}): rerun pbs-up.sh")
    return data


def require_tool(name: str) -> str:
    """The path of a system tool; skip when absent, but fail under CI=true (CI must have it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message}, but CI=true requires it (.ci/run installs it)")
        pytest.skip(message)
    return path


@pytest.fixture()
def curl() -> str:
    """The curl binary, the reference client users compare us with."""
    return require_tool("curl")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own state folder and no credentials from the environment."""
    home = tmp_path / "hpcbridge-home"
    monkeypatch.setenv("HPCBRIDGE_HOME", str(home))
    for var in list(os.environ):
        if (
            var.startswith("HPCBRIDGE_")
            and var != "HPCBRIDGE_HOME"
            or var in ("XNAT_HOST", "XNAT_USER", "XNAT_PASS")
        ):
            monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def demo_sandbox() -> Iterator[SandboxServer]:
    """A seeded sandbox shared by read-only tests. Do not modify its archive."""
    with SandboxServer(seed="demo") as server:
        yield server


@pytest.fixture()
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    """A fresh seeded sandbox of this test's own, free to modify."""
    with SandboxServer(tmp_path / "sandbox-data", seed="demo") as server:
        yield server


@pytest.fixture()
def make_sandbox(tmp_path: Path) -> Iterator:
    """Factory for sandboxes with custom auth settings or faults; all stopped at teardown."""
    servers: list[SandboxServer] = []

    def make(
        *, seed: str | None = "demo", auth: AuthSettings | None = None, **kwargs
    ) -> SandboxServer:
        data = tmp_path / f"sandbox-{len(servers)}"
        server = SandboxServer(data, seed=seed, auth=auth, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture()
def admin(demo_sandbox: SandboxServer) -> Iterator[requests.Session]:
    """A requests session logged in to the shared sandbox with one JSESSIONID."""
    with requests.Session() as http:
        resp = http.post(
            demo_sandbox.url + "/data/JSESSION",
            auth=(demo_sandbox.user, demo_sandbox.password),
            timeout=10,
        )
        assert resp.status_code == 200
        yield http
        http.delete(demo_sandbox.url + "/data/JSESSION", timeout=10)


def _runner_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _stop_local_jobs(root: Path, timeout: float = 30.0) -> None:
    """Cancel every job the local scheduler under ``root`` ran and wait for its runner to exit,
    each by its own id and pid (never by name)."""
    from hpcbridge.schedulers.local import LocalScheduler

    ids = [p.name for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    if not ids:
        return
    LocalScheduler(root).cancel(ids)
    deadline = time.monotonic() + timeout
    for job_id in ids:
        pid_file = root / job_id / "runner.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        while not _runner_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _runner_gone(pid), f"runner {pid} of local job {job_id} did not exit"


@pytest.fixture()
def stop_local_jobs() -> Callable[[Path], None]:
    """``stop_local_jobs(root)``: end what a local scheduler under ``root`` still runs."""
    return _stop_local_jobs


@pytest.fixture()
def no_local_jobs_left(isolated_home: Path) -> Iterator[None]:
    """At teardown, cancel the local jobs a test left behind and wait for their runners."""
    yield
    _stop_local_jobs(isolated_home / "local-jobs")
