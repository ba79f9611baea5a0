"""Many chain transfer jobs at once in one work root: the real `hpcbridge stage-in` and
`hpcbridge stage-out --spec` processes a chain's transfer jobs run, sharing one run folder (its
staging tree) and one chain folder (its token and cached XNAT session), against a sandbox XNAT
over HTTP.

On a cluster the jobs of many chains start within the same second, on nodes that share the
file system: whatever they share must be safe to use from all of them at once. The processes
here are released together from a barrier (each waits with hpcbridge already imported), and
the sandbox ends every server session part-way through a round, so that jobs find their
shared cached session dead and renew it while their siblings do the same; they must open one
new session between them each time, not one each. Each round also stages three scans and
uploads three jobs' outputs twice at once, as overlapping retries do.
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
STAGE_OUTS = 9  # per round, 3 of them repeated, beside 9 scans' stage-ins and 3 repeated ones
#: Seconds after the barrier at which every server session is ended the first time.
SESSION_END_DELAY = 0.3
SESSION_END_GAP = 0.3
TIME_LIMIT = 50.0  # seconds all rounds may take, far above what they need

# Says it is ready with hpcbridge's CLI imported, waits for the barrier, then runs the CLI as
# `hpcbridge` would: the race is between the commands' work, not their start-up.
LAUNCHER = """
import os, sys, time
from hpcbridge.cli import main
import hpcbridge.stagein, hpcbridge.outputs, hpcbridge.stageout, hpcbridge.xnat
barrier = sys.argv[1]
open(f"{barrier}.ready-{os.getpid()}", "w").close()
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


def _spec(folder: Path, resource: str) -> Path:
    """A stage-out job's output folder and spec, as the chain writes them."""
    out = folder / "out"
    out.mkdir(parents=True)
    for n in range(3):
        (out / f"result{n}.txt").write_text(f"output {n} for {resource}\n" * 50)
    spec = folder / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "outputs": [{"glob": "*.txt", "resource": resource}],
                "provenance": {"recipe": "stress", "job": {"id": resource}},
                "status_file": str(folder / "status.json"),
                "report": str(folder / "uploaded.json"),
            }
        )
    )
    return spec


def _end_sessions(server: Any, procs: list[subprocess.Popen[str]], stop: threading.Event) -> None:
    """End every live server session a few times during a round (soon after the start, and
    when a third and two thirds of the jobs have ended), as an XNAT that times sessions out
    does: the jobs still working find the session they share dead, and renew it at once. (At
    least SESSION_END_GAP apart: a session ended between a job's new login and its retried
    request fails the job rightly, as a client re-authenticates once per request.)"""
    marks = [len(procs) // 3, 2 * len(procs) // 3]
    ends = 0
    if not stop.wait(SESSION_END_DELAY):
        ends += 1
        _end_all(server)
        while marks and not stop.wait(SESSION_END_GAP):
            while not stop.wait(0.01):
                if sum(p.poll() is not None for p in procs) >= marks[0]:
                    marks.pop(0)
                    _end_all(server)
                    ends += 1
                    break
    server.session_ends = getattr(server, "session_ends", 0) + ends


def _end_all(server: Any) -> None:
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
    opened = server.authority.sessions_created  # the bridge's, issuing the token
    deadline = time.monotonic() + TIME_LIMIT
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
            # the first three twice at once, the same outputs into the same resource, as an
            # overlapping retry of a stage-out job does
            subject, experiment = SESSIONS[i % 6 % 3]
            scan = list(SCANS)[i % 6 % 3]
            job = round_no * STAGE_OUTS + i
            resource = f"STRESS{round_no}_{i % 6}"
            spec = _spec(root / f"so-{job}" / "chain" / "stage-out", resource)
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
        stop = threading.Event()
        killer = threading.Thread(target=_end_sessions, args=(server, procs, stop), daemon=True)
        try:
            while len(list(tmp_path.glob(f"{barrier.name}.ready-*"))) < len(procs):
                assert time.monotonic() < deadline, "the processes did not start in time"
                assert all(p.poll() is None for p in procs), "a process ended before the barrier"
                time.sleep(0.02)
            barrier.touch()
            killer.start()
            for command, proc in zip(commands, procs, strict=True):
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                if proc.returncode != 0:
                    failures.append(f"round {round_no}: {' '.join(command[4:6])}: {err.strip()}")
        finally:
            stop.set()
            if killer.is_alive():
                killer.join()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert not failures, "\n".join(failures)
        # The jobs shared their sessions: one opened at the start and one after each time
        # XNAT ended them (a few more when a job adopts a session that dies at once), not
        # one per job.
        ends = getattr(server, "session_ends", 0)
        new = server.authority.sessions_created - opened
        assert new <= 2 * (ends + 1), f"{new} sessions for {len(procs)} jobs, ended {ends} times"
        opened = server.authority.sessions_created
        server.session_ends = 0
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
        leftovers = [p.name for p in (home / "sessions").iterdir() if p.suffix == ".part"]
        assert leftovers == []
        assert (home / "credentials.json").is_file()
        # The next round downloads again, into the same work root.
        for _subject, experiment in SESSIONS:
            for folder in SCANS.values():
                scans = root / experiment / "scans"
                for path in sorted((scans / folder).rglob("*"), reverse=True):
                    path.unlink() if path.is_file() else path.rmdir()
