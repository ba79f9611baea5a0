"""Many chain transfer jobs at once in one work root: the real `hpcbridge stage-in` and
`hpcbridge stage-out --spec` processes a chain's transfer jobs run, sharing one run folder (its
staging tree) and one chain folder (its token and cached XNAT session), against a sandbox XNAT
over HTTP.

On a cluster the jobs of many chains start within the same second, on nodes that share the
file system: whatever they share must be safe to use from all of them at once. The processes
here are released together from a barrier (each waits with hpcbridge already imported), and
the sandbox ends every server session part-way through a round, so that jobs find their
shared cached session dead and renew it while their siblings do the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpcbridge import chain
from hpcbridge.config import load_settings
from hpcbridge.credentials import Secret, scrubbed_environ
from hpcbridge.stagein import STAGING, open_manifest
from hpcbridge.transport import LocalTransport
from hpcbridge.xnat.client import XnatClient

PROJECT = "PTV000"
SESSIONS = [(f"Haofei0{n}", f"Haofei0{n}_MR1") for n in (1, 2, 3)]
SCANS = {"1": "1-Localizer", "4": "4-Ax_3D_T1", "5": "5-ep2d_bold__rest_"}
ROUNDS = 3
STAGE_OUTS = 12  # per round, beside 9 scans' stage-ins and 3 repeated ones
#: Seconds after the barrier at which every server session is ended, one after the other.
SESSION_ENDS = (0.4, 0.8)
PROCESS_LIMIT = 40.0  # seconds a round may take, a bound far above a normal round

# Waits for the barrier with hpcbridge's CLI already imported, then runs it as `hpcbridge`
# would: the race is between the commands' work, not their start-up.
LAUNCHER = """
import os, sys, time
from hpcbridge.cli import main
import hpcbridge.stagein, hpcbridge.outputs, hpcbridge.stageout, hpcbridge.xnat
barrier = sys.argv[1]
while not os.path.exists(barrier):
    time.sleep(0.002)
sys.argv = ["hpcbridge", *sys.argv[2:]]
main()
"""


@pytest.fixture()
def chain_root(make_sandbox: Any, tmp_path: Path) -> tuple[Any, Path, Path]:
    """A run folder with its chain folder, written as `run --chain` writes it."""
    server = make_sandbox()
    root = tmp_path / "work" / "run-1"
    settings = load_settings(
        environ={"HPCBRIDGE_HOME": str(tmp_path / "bridge-home")},
        flags={"xnat": server.url, "allow_insecure_http": True},
    )
    bridge = XnatClient(
        server.url, Secret(server.user, server.password, "environment"), allow_insecure_http=True
    )
    with bridge:
        token = chain.fresh_token(bridge)
    chain.install_token(LocalTransport(), str(root), server.url, token, settings)
    return server, root, Path(chain.home_of(str(root)))


def _spec(folder: Path, index: int) -> Path:
    """A stage-out job's output folder and spec, as the chain writes them."""
    out = folder / "out"
    out.mkdir(parents=True)
    for n in range(3):
        (out / f"result{n}.txt").write_text(f"output {n} of job {index}\n" * 50)
    spec = folder / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "outputs": [{"glob": "*.txt", "resource": f"STRESS{index}"}],
                "provenance": {"recipe": "stress", "job": {"id": str(index)}},
                "status_file": str(folder / "status.json"),
                "report": str(folder / "uploaded.json"),
            }
        )
    )
    return spec


def _end_sessions(server: Any, stop: threading.Event) -> None:
    """End every live server session twice during a round, as an XNAT that times sessions out
    does: jobs then find the session they share dead, and renew it all at once. (Not more
    often: a session ended between a job's new login and its retried request fails the job
    rightly, as a client re-authenticates once per request.)"""
    for delay in SESSION_ENDS:
        if stop.wait(delay):
            return
        for sid in list(server.authority.sessions):
            server.authority.close_session(sid)


def test_many_transfer_jobs_at_once_share_a_work_root_and_chain_folder(
    chain_root: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    server, root, home = chain_root
    env = scrubbed_environ()
    env["HPCBRIDGE_HOME"] = str(home)
    env.pop("HPCBRIDGE_XNAT", None)
    env.pop("HPCBRIDGE_USER", None)
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    bridge = [sys.executable, "-c", LAUNCHER]
    common = ["--config", str(home / "config.toml"), "--profile", "chain"]
    failures: list[str] = []
    for round_no in range(ROUNDS):
        barrier = tmp_path / f"go-{round_no}"
        commands: list[list[str]] = []
        for subject, experiment in SESSIONS:
            for scan in SCANS:
                commands.append(
                    [*common, "stage-in", f"{PROJECT}/{subject}/{experiment}", "--scan", scan]
                    + ["--resource", "DICOM", "--dest", str(root)]
                )
        commands += commands[:3]  # a scan staged twice at once, as an overlapping retry does
        for i in range(STAGE_OUTS):
            subject, experiment = SESSIONS[i % 3]
            scan = list(SCANS)[i % 3]
            job = round_no * STAGE_OUTS + i
            spec = _spec(root / f"so-{job}" / "chain" / "stage-out", job)
            commands.append(
                [*common, "stage-out", f"{PROJECT}/{subject}/{experiment}/{scan}"]
                + ["--spec", str(spec), str(spec.parent / "out")]
            )
        procs = [
            subprocess.Popen(
                [*bridge, str(barrier), *command],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for command in commands
        ]
        time.sleep(1.0)  # let them import and reach the barrier
        stop = threading.Event()
        killer = threading.Thread(target=_end_sessions, args=(server, stop), daemon=True)
        barrier.touch()
        killer.start()
        deadline = time.monotonic() + PROCESS_LIMIT
        try:
            for command, proc in zip(commands, procs, strict=True):
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if proc.returncode != 0:
                    failures.append(f"round {round_no}: {' '.join(command[4:6])}: {err.strip()}")
        finally:
            stop.set()
            killer.join()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert not failures, "\n".join(failures)
        for _subject, experiment in SESSIONS:
            for folder in SCANS.values():
                staged = root / experiment / "scans" / folder / "resources" / "DICOM"
                assert open_manifest(staged)["files"], staged
        for i in range(STAGE_OUTS):
            job = round_no * STAGE_OUTS + i
            report = root / f"so-{job}" / "chain" / "stage-out" / "uploaded.json"
            uploaded = json.loads(report.read_text())["uploaded"]
            assert sorted(u["name"] for u in uploaded) == [
                "hpcbridge-provenance.json",
                "result0.txt",
                "result1.txt",
                "result2.txt",
            ]
        # Every job cleaned up after itself, and nobody else's work.
        assert not (root / STAGING).exists() or not any((root / STAGING).rglob("*"))
        leftovers = [p.name for p in (home / "sessions").iterdir() if p.suffix != ".json"]
        assert leftovers == []
        assert (home / "credentials.json").is_file()
        # The next round downloads again, into the same work root.
        for _subject, experiment in SESSIONS:
            for folder in SCANS.values():
                scans = root / experiment / "scans"
                for path in sorted((scans / folder).rglob("*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
