#!/usr/bin/env python3
"""Benchmark: what orchestrating a run costs, for 10, 100 and 1,000 scans (issue 8).

Runs ``hpcbridge run RECIPE PROJECT --wait`` over projects of N scans served by the sandbox XNAT
(``hpcbridge sandbox serve`` on loopback), with the local scheduler and, with ``--cluster``, over
SSH to the CI cluster's Slurm through its PBS wrappers (``qsub``) and through ``sbatch``; and in
the same run the naive way of the Artemis guide: a bash loop of ``curl`` (the scan's DICOM as a
zip) + ``unzip`` + ``qsub`` per scan, a wait, and ``curl`` uploads of the outputs.

    python tests/benchmarks/bench_runs.py                                   # 10 scans, quick
    python tests/benchmarks/bench_runs.py --scans 10,100,1000 --cluster --dcm2niix --out r.md

For every row it reports, from the sandbox's own counters (``GET /sandbox/stats``) and from
counters in the hpcbridge process: the XNAT sessions created (target: 1 per run), the SSH
connections (target: 1), the scheduler status calls per poll cycle (target: 1), the HTTP
requests (and per scan), the planning time, the submit time per job, and the end-to-end wall
time. The script exits 1 when an hpcbridge row breaks a COUNT target (more than one XNAT
session, more than one SSH connection, more than one status call in a poll) or does not upload
every scan; times are reported, never asserted. The naive rows are the reference and never
fail the run.

How hpcbridge is driven: as users do, ``hpcbridge run ... --wait`` with a profile in a fresh
``HPCBRIDGE_HOME`` (credentials from ``HPCBRIDGE_USER``/``HPCBRIDGE_PASSWORD``). The process is
``python -c CHILD run ...``: CHILD wraps a few library functions with counters and timers (the
scheduler's ``status_calls`` per sync pass, scheduler commands run through the transport,
``SshTransport`` connections and their local ports, time in ``start_run``, ``submit_script``,
stage-in and stage-out), then calls the same ``hpcbridge.cli.main`` as the ``hpcbridge``
command. The SSH count is checked against sshd's own log (each connection's source port). The
planning time is also measured as a user sees it, with ``run --dry-run`` as its own command.

The recipe is a cheap lab recipe (``ls`` of the input into ``files.txt``), so the numbers are
hpcbridge's and the scheduler's, not dcm2niix's; ``--dcm2niix`` adds rows with the built-in
dcm2niix recipe (and the naive loop running dcm2niix). Each row gets a project of its own, N
subjects with one MR session each and one T1 scan (scan 4, as in the guide) of ``--slices``
small DICOM files, seeded straight into the archive before the server starts.

Children run with ``PYTHONPATH`` set to ``--source`` (default: this checkout, so the working
tree's code); to measure a commit, export it (``git archive COMMIT | tar -x -C DIR``) and pass
``--source DIR``. This is a measurement run on demand, not part of the test suite
(pyproject's testpaths do not include tests/benchmarks). Everything it starts is stopped by its
PID; its jobs are cancelled by their ids when a row times out; its temporary folder is removed
(``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from sandbox_process import READY_TIMEOUT, BenchFailure, stop_server

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files  # noqa: E402
from hpcbridge.sandbox.store import Store  # noqa: E402

ADMIN = "admin"
SCAN_ID = "4"
SCAN_TYPE = "Ax 3D T1"
CLUSTER_JSON = "/tmp/hpcbridge-ci-cluster/cluster.json"
T = 30  # seconds for one HTTP request of the benchmark itself

# The cheapest job that still reads its input and writes an output: orchestration only.
CHEAP_RECIPE = '''
name = "bench-ls"
description = "lists the scan's DICOM files into files.txt"
version = "1"

[resources]
cpus = 1
memory = "100MB"
walltime = "00:05:00"

[inputs]
resource = "DICOM"
scan_types = ["*"]

[[outputs]]
glob = "*.txt"
resource = "OUT"

[run]
command = """
ls {{ input_dir }} > {{ output_dir }}/files.txt
"""
'''

# -- the hpcbridge process, with counters --------------------------------------------------------
# Counters and timers around library functions; then the very CLI entry point users run. It
# writes one JSON document to $BENCH_RUNS_OUT when the command ends.
CHILD = r"""
import json, os, sys, time

OUT = os.environ["BENCH_RUNS_OUT"]
STATUS_COMMANDS = {"qstat", "squeue", "sacct"}
data = {"plan_s": None, "passes": [], "submit_one": [], "stage_in": [], "submit_script": [],
        "stage_out": [], "ssh_ports": [], "ssh_connections": 0, "final_counts": {}}
now = {"status_commands": 0, "transport_ops": 0, "record_reads": 0, "polled": 0, "depth": 0}

import hpcbridge
from hpcbridge import jobs, runs
from hpcbridge.runs import single
from hpcbridge.runs import sync as passes
from hpcbridge.transport import LocalTransport

data["module"] = hpcbridge.__file__

def timed(module, name, key):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if key == "plan_s":
                data[key] = time.perf_counter() - t0
            else:
                data[key].append(time.perf_counter() - t0)
    setattr(module, name, wrapper)

for module, name, key in ((runs, "start_run", "plan_s"),
                          (single.SingleJob, "submit", "submit_one"),
                          (single, "_stage_in_one", "stage_in"),
                          (single, "submit_script", "submit_script"),
                          (single.SingleJob, "uploaded", "stage_out")):
    timed(module, name, key)

data["ops"] = {}  # transport calls by kind ("run qsub", "put", ...): [count, seconds]

def counting(cls, name):
    original = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        # only the outermost call: one transport method may use another
        outer = now["depth"] == 0
        kind = name
        if outer:
            now["transport_ops"] += 1
            if name == "run":
                argv = args[0] if args else kwargs.get("argv") or [""]
                command = os.path.basename(str(argv[0]))
                kind = f"run {command}"
                # `qstat --version` asks which PBS this is (once, at the first submission)
                if command in STATUS_COMMANDS and "--version" not in map(str, argv):
                    now["status_commands"] += 1
        now["depth"] += 1
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            now["depth"] -= 1
            if outer:
                seen = data["ops"].setdefault(f"{type(self).__name__}.{kind}", [0, 0.0])
                seen[0] += 1
                seen[1] += time.perf_counter() - t0
    setattr(cls, name, wrapper)

transports = [LocalTransport]
try:
    from hpcbridge.ssh import SshTransport
    transports.append(SshTransport)
    _connect = SshTransport._connect
    def connect(self):
        opened = _connect(self)
        data["ssh_connections"] += 1
        try:
            data["ssh_ports"].append(self._transports[0].sock.getsockname()[1])
        except Exception:
            pass
        return opened
    SshTransport._connect = connect
except ImportError:
    pass
for cls in transports:
    # files_in and remove (SFTP listing and delete) exist from 43a1c56 on
    for name in ("run", "write_text", "read_text", "put", "get", "makedirs", "files_in", "remove"):
        if hasattr(cls, name):
            counting(cls, name)

# Every HTTP request the run makes, by method and path with the names and ids taken out.
import re, requests
SHAPES = [(re.compile(p), r) for p, r in (
    (r"/(projects|subjects|experiments|scans|resources)/[^/?]+", r"/\1/*"),
    (r"/files/[^?]+", "/files/*"),
    (r"\?.*", ""),
)]
data["http"] = {}
_request = requests.Session.request
def request(self, method, url, *args, **kwargs):
    path = "/" + url.split("://", 1)[-1].split("/", 1)[-1]
    for pattern, repl in SHAPES:
        path = pattern.sub(repl, path)
    params = kwargs.get("params") or {}
    if isinstance(params, dict) and params.get("format") == "zip":
        path += "?format=zip"
    key = f"{method} {path}"
    data["http"][key] = data["http"].get(key, 0) + 1
    return _request(self, method, url, *args, **kwargs)
requests.Session.request = request

_get = jobs.JobStore.get
def get(self, job_id):
    now["record_reads"] += 1
    return _get(self, job_id)
jobs.JobStore.get = get

_refresh = passes.refresh
def refresh(store, scheduler, records=None):
    now["polled"] += len(records) if records is not None else len(store.all())
    return _refresh(store, scheduler, records)
passes.refresh = refresh

_sync = passes.one_pass
def sync(session, run, **kwargs):
    before = dict(now)
    calls = session.scheduler.status_calls
    t0 = time.perf_counter()
    report = _sync(session, run, **kwargs)
    data["passes"].append({
        "seconds": time.perf_counter() - t0,
        "polled": now["polled"] - before["polled"],
        "status_calls": session.scheduler.status_calls - calls,
        "status_commands": now["status_commands"] - before["status_commands"],
        "transport_ops": now["transport_ops"] - before["transport_ops"],
        "record_reads": now["record_reads"] - before["record_reads"],
        "submitted": len(report.submitted),
        "uploaded": len(report.uploaded),
        "failed": len(report.failed),
    })
    data["final_counts"] = dict(report.counts)
    return report
passes.one_pass = sync

from hpcbridge.cli import main

code = 0
t0 = time.perf_counter()
try:
    main(sys.argv[1:], prog_name="hpcbridge")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    data["seconds"] = time.perf_counter() - t0
    data["exit_code"] = code
    data["transport_ops"] = now["transport_ops"]
    data["status_commands"] = now["status_commands"]
    with open(OUT, "w") as fh:
        json.dump(data, fh)
sys.exit(code)
"""

# -- the naive way -------------------------------------------------------------------------------
# As in the Artemis guide (curl -u ... ?format=zip; qsub run.pbs; curl -X PUT -F file=@...), with
# the credentials in a 0600 netrc instead of typed passwords, and a wait that asks qstat about
# each job it has not yet seen end. Prints "BENCH key value" lines; times in microseconds from
# bash's EPOCHREALTIME, so measuring starts no process.
NAIVE_SH = r"""#!/bin/bash
set -u
NETRC=$1 URL=$2 PROJECT=$3 WORK=$4 MODE=$5 INTERVAL=$6 JOB=$7 RESOURCE=$8
SCAN=4
now() { echo "${EPOCHREALTIME/./}"; }
xnat() { curl -sS -f --netrc-file "$NETRC" "$@"; }
t0=$(now)
echo "BENCH ssh ${SSH_CONNECTION:-none}"
mkdir -p "$WORK" && cd "$WORK" || exit 1
# the project's sessions, in one listing (the guide has users type each label)
columns=ID,label,subject_label
xnat -o sessions.csv "$URL/data/projects/$PROJECT/experiments?format=csv&columns=$columns" || exit 1
t_list=$(now)
n=0; failed=0; submit_us=0; jobs=()
: > submitted.txt
while IFS=, read -r id label subject _; do
    [ "$id" = ID ] && continue
    n=$((n + 1))
    d="$WORK/$label"
    mkdir -p "$d/out" && cd "$d" || exit 1
    scan_url="$URL/data/projects/$PROJECT/subjects/$subject/experiments/$label/scans/$SCAN"
    if ! xnat -o dicom.zip "$scan_url/resources/DICOM/files?format=zip"; then
        failed=$((failed + 1)); continue
    fi
    unzip -q -o dicom.zip -d in && rm dicom.zip
    input=$(dirname "$(find "$d/in" -name '*.dcm' -print -quit)")
    case $JOB in
        dcm2niix) command="dcm2niix -z y -b y -f %p_%s -o $d/out $input" ;;
        *) command="ls $input > $d/out/files.txt" ;;
    esac
    cat > run.pbs <<EOF
#!/bin/bash
#PBS -N nv_$label
#PBS -l select=1:ncpus=1:mem=100mb
#PBS -l walltime=00:05:00
cd $d
$command
EOF
    ts=$(now)
    if [ "$MODE" = qsub ]; then
        if jid=$(qsub run.pbs); then jobs+=("$jid"); else failed=$((failed + 1)); continue; fi
    else
        bash run.pbs > run.log 2>&1 &
        jobs+=("$!")
    fi
    submit_us=$((submit_us + $(now) - ts))
    echo "$label $subject" >> "$WORK/submitted.txt"
done < "$WORK/sessions.csv"
t_submitted=$(now)
cycles=0; calls=0; max_calls=0
if [ "$MODE" = qsub ]; then
    pending=("${jobs[@]}")
    while [ ${#pending[@]} -gt 0 ]; do
        cycles=$((cycles + 1)); this=0; still=()
        for j in "${pending[@]}"; do
            this=$((this + 1))
            state=$(qstat -f "$j" 2>/dev/null | awk '/job_state/ {print $3}')
            # an id qstat no longer knows (exit 153) has ended too
            case $state in Q|R|H|W|T|E|S) still+=("$j") ;; esac
        done
        calls=$((calls + this)); [ $this -gt $max_calls ] && max_calls=$this
        pending=(${still[@]+"${still[@]}"})
        [ ${#pending[@]} -gt 0 ] && sleep "$INTERVAL"
    done
else
    wait
fi
t_waited=$(now)
uploads=0
while read -r label subject; do
    scan_url="$URL/data/projects/$PROJECT/subjects/$subject/experiments/$label/scans/$SCAN"
    for f in "$WORK/$label"/out/*; do
        [ -f "$f" ] || continue
        if xnat -o /dev/null -X PUT -F "file=@$f" "$scan_url/resources/$RESOURCE/files"; then
            uploads=$((uploads + 1))
        else
            failed=$((failed + 1))
        fi
    done
done < "$WORK/submitted.txt"
t_end=$(now)
echo "BENCH scans $n"
echo "BENCH jobs ${#jobs[@]}"
echo "BENCH job_ids ${jobs[*]}"
echo "BENCH failed $failed"
echo "BENCH uploads $uploads"
echo "BENCH list_us $((t_list - t0))"
echo "BENCH stage_submit_us $((t_submitted - t_list))"
echo "BENCH submit_us $submit_us"
echo "BENCH wait_us $((t_waited - t_submitted))"
echo "BENCH upload_us $((t_end - t_waited))"
echo "BENCH cycles $cycles"
echo "BENCH status_calls $calls"
echo "BENCH max_calls $max_calls"
"""


# -- child processes ---------------------------------------------------------------------------
@dataclass
class Child:
    returncode: int
    wall: float
    stdout: str
    stderr: str
    timed_out: bool = False


def run_child(
    argv: list[str],
    *,
    env: dict[str, str],
    timeout: float,
    log: Path,
    stdin: Path | None = None,
) -> Child:
    """Run ``argv`` in its own process group; kill the group (ours) when it outlives ``timeout``.

    stderr goes to ``log`` (a 1,000-scan run writes a line per scan and state), stdout is kept.
    The child starts in the log's folder, not here: ``python -c`` and ``-m`` put their working
    folder first on the import path, which would import this checkout instead of ``--source``.
    """
    out_path = log.with_suffix(".out")
    with (
        open(out_path, "wb") as out,
        open(log, "wb") as err,
        open(stdin or os.devnull, "rb") as inp,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=inp,
            stdout=out,
            stderr=err,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:  # the benchmark itself is stopped (SIGTERM, Ctrl-C) mid-row
            kill_group(proc)
            raise
        wall = time.perf_counter() - t0
    return Child(
        proc.returncode,
        wall,
        out_path.read_text(errors="replace"),
        log.read_text(errors="replace"),
        timed_out,
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End a child we started and whatever it started in its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(text: str, n: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


# -- the archive ---------------------------------------------------------------------------------
def subject_label(i: int) -> str:
    return f"S{i:04d}"


def session_label(i: int) -> str:
    return f"S{i:04d}_MR1"


def seed(data_dir: Path, projects: list[tuple[str, int, int]]) -> None:
    """N subjects with one session and one T1 scan each, per project, straight into the store.

    Every scan of a project gets the same small series (same bytes): what is measured is the
    orchestration around each scan, and generating thousands of distinct series would only make
    the set-up slower.
    """
    store = Store(data_dir)
    series: dict[int, list[tuple[str, bytes]]] = {}
    try:
        for project, n, slices in projects:
            if slices not in series:
                series[slices] = series_files(
                    SeriesSpec(int(SCAN_ID), SCAN_TYPE, n_slices=slices),
                    patient_id="BENCH",
                    patient_name="Bench^Runs",
                    study_uid=make_uid("bench-runs", str(slices)),
                )
            store.create_project(project, ADMIN, name=f"bench runs {project}", secondary_id=project)
            for i in range(1, n + 1):
                subject = store.create_subject(project, subject_label(i), ADMIN)
                session = store.create_experiment(
                    project,
                    subject["id"],
                    session_label(i),
                    "xnat:mrSessionData",
                    ADMIN,
                    date="2024-01-02",
                )
                scan = store.put_scan(
                    session["id"],
                    SCAN_ID,
                    "xnat:mrScanData",
                    type=SCAN_TYPE,
                    series_description=SCAN_TYPE,
                    frames=str(slices),
                )
                res = store.create_resource(
                    "scan", str(scan["pk"]), "DICOM", format="DICOM", content="RAW"
                )
                for name, blob in series[slices]:
                    store.add_file(res["id"], name, store.spool(iter([blob])), overwrite=True)
    finally:
        store.close()


def start_sandbox(
    work: Path, env: dict[str, str], max_sessions: int
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """``hpcbridge sandbox serve`` on the seeded archive (sandbox_process.start_server has no
    way to pass ``--max-sessions``)."""
    ready = work / "ready.json"
    log_path = work / "server.log"
    argv = [sys.executable, "-m", "hpcbridge", "sandbox", "serve", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--ready-file", str(ready), "--data", str(work / "server-data")]
    argv += ["--max-sessions", str(max_sessions)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=work
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if ready.exists():
            try:
                return proc, json.loads(ready.read_text())
            except ValueError:
                pass
        if proc.poll() is not None:
            raise BenchFailure(
                f"the sandbox exited with code {proc.returncode} while starting:\n"
                + tail(log_path.read_text(errors="replace"), 2000)
            )
        time.sleep(0.05)
    stop_server(proc, None)
    raise BenchFailure(f"the sandbox was not ready within {READY_TIMEOUT:g} s")


class Xnat:
    """The benchmark's own view of the sandbox: one admin session for every look it takes."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.url = str(info["url"]).rstrip("/")
        self.user, self.password = str(info["user"]), str(info["password"])
        self.http = requests.Session()
        self.http.auth = (self.user, self.password)
        self.stats()  # opens this session now, before any count is taken

    def stats(self) -> dict[str, Any]:
        resp = self.http.get(self.url + "/sandbox/stats", timeout=T)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def outputs(self, project: str, i: int, resource: str) -> dict[str, str]:
        """File name -> md5 in the resource of scan 4 of subject i's session ({} if none)."""
        url = (
            f"{self.url}/data/projects/{project}/subjects/{subject_label(i)}"
            f"/experiments/{session_label(i)}/scans/{SCAN_ID}/resources/{resource}/files"
        )
        resp = self.http.get(url, params={"format": "json"}, timeout=T)
        if resp.status_code == 404:
            return {}
        resp.raise_for_status()
        return {r["Name"]: r.get("digest", "") for r in resp.json()["ResultSet"]["Result"]}


@dataclass
class Delta:
    requests: int
    by_method: dict[str, int]
    sessions: int
    left_open: int


def delta(before: dict[str, Any], after: dict[str, Any]) -> Delta:
    """What happened between two stats snapshots, less the second snapshot's own GET."""
    methods = set(before["requests"]) | set(after["requests"])
    change = {m: after["requests"].get(m, 0) - before["requests"].get(m, 0) for m in methods}
    change["GET"] = change.get("GET", 0) - 1
    return Delta(
        requests=sum(change.values()),
        by_method={m: c for m, c in sorted(change.items()) if c},
        sessions=after["sessions_created"] - before["sessions_created"],
        left_open=after["sessions_live"] - before["sessions_live"],
    )


# -- rows ----------------------------------------------------------------------------------------
@dataclass
class Spec:
    target: str  # local, pbs, slurm
    tool: str  # hpcbridge, naive
    recipe: str  # bench-ls, dcm2niix
    n: int
    slices: int

    @property
    def key(self) -> str:
        return f"{self.target}-{self.tool}-{self.recipe}-{self.n}"

    @property
    def project(self) -> str:
        tool = "HB" if self.tool == "hpcbridge" else "NV"
        recipe = "D" if self.recipe == "dcm2niix" else "L"
        return f"B{tool}{self.target.upper()}{recipe}{self.n}"

    @property
    def where(self) -> str:
        return {
            "local": "local scheduler",
            "pbs": "CI cluster, qsub over SSH",
            "slurm": "CI cluster, sbatch over SSH",
        }[self.target]

    @property
    def resource(self) -> str:
        if self.recipe == "dcm2niix" and self.tool == "hpcbridge":
            return "NIFTI"
        return "OUT"


@dataclass
class Result:
    spec: Spec
    wall: float = float("nan")
    xnat: Delta | None = None
    ssh: int | None = None  # connections; None where nothing used SSH
    ssh_checked: str = ""  # what sshd's log says about them
    status_max: int | None = None  # status calls in the busiest poll cycle
    polls: int = 0
    plan_s: float = float("nan")
    dry_run_s: float = float("nan")
    dry_run_requests: int = 0
    stage_submit_ms: float = float("nan")  # per job: stage-in + render + submit (+ its workflow)
    submit_ms: float = float("nan")  # per job: the scheduler submission alone
    stage_in_ms: float = float("nan")
    stage_out_ms: float = float("nan")
    passes: int = 0
    sync_s: float = float("nan")
    transport_ops: int = 0
    record_reads_max: int = 0
    naive: dict[str, int] = field(default_factory=dict)
    http: dict[str, int] = field(default_factory=dict)  # hpcbridge's requests by shape
    ops: dict[str, list[float]] = field(default_factory=dict)  # transport calls: [count, s]
    uploaded: int = 0
    errors: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # COUNT targets missed (hpcbridge rows)

    @property
    def per_scan(self) -> float:
        return self.xnat.requests / self.spec.n if self.xnat else float("nan")


def mean_ms(values: list[float]) -> float:
    return statistics.fmean(values) * 1000 if values else float("nan")


class Bench:
    def __init__(
        self,
        work: Path,
        xnat: Xnat,
        base_env: dict[str, str],
        args: argparse.Namespace,
        cluster: dict[str, Any] | None,
        source: Path,
    ) -> None:
        self.work, self.xnat, self.base_env, self.args = work, xnat, base_env, args
        self.source = source
        self.cluster = cluster
        self.recipes = work / "recipes"
        self.recipes.mkdir()
        (self.recipes / "bench-ls.toml").write_text(CHEAP_RECIPE)
        self.naive_sh = work / "naive.sh"
        self.naive_sh.write_text(NAIVE_SH)
        self.netrc = work / "netrc"
        fd = os.open(self.netrc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        host = xnat.url.split("://", 1)[1].split("/", 1)[0].split(":")[0]
        with os.fdopen(fd, "w") as fh:
            fh.write(f"machine {host} login {xnat.user} password {xnat.password}\n")
        self.logs = work / "logs"
        self.logs.mkdir()

    # ---------------------------------------------------------------------------------------
    def timeout(self, spec: Spec) -> float:
        per_scan = 2.0 if spec.target == "local" else 8.0
        if spec.recipe == "dcm2niix":
            per_scan *= 3
        return self.args.row_timeout or 300.0 + per_scan * spec.n

    def env(self, home: Path) -> dict[str, str]:
        return {
            **self.base_env,
            "HPCBRIDGE_HOME": str(home),
            "HPCBRIDGE_XNAT": self.xnat.url,
            "HPCBRIDGE_USER": self.xnat.user,
            "HPCBRIDGE_PASSWORD": self.xnat.password,
        }

    def profile(self, spec: Spec, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        lines = [
            'default_profile = "bench"',
            "",
            "[profiles.bench]",
            f'scheduler = "{"local" if spec.target == "local" else spec.target}"',
            f"poll_interval = {self.args.interval}",
        ]
        if spec.target != "local":
            assert self.cluster is not None
            lines += [
                f'host = "{self.cluster["ssh"]["alias"]}"',
                f'ssh_config = "{self.cluster["ssh"]["ssh_config"]}"',
                f'work_root = "{self.work / ("cluster-work-" + spec.key)}"',
            ]
        (home / "config.toml").write_text("\n".join(lines) + "\n")

    def check_outputs(self, spec: Spec, result: Result) -> None:
        """Every scan's resource holds the job's outputs (and hpcbridge's provenance file)."""
        if spec.recipe == "dcm2niix":
            want = {"Ax_3D_T1_4.nii.gz", "Ax_3D_T1_4.json"}
            md5 = None
        else:
            want = {"files.txt"}
            listing = "".join(f"{i:04d}.dcm\n" for i in range(1, spec.slices + 1))
            md5 = hashlib.md5(listing.encode()).hexdigest()
        if spec.tool == "hpcbridge":
            want.add("hpcbridge-provenance.json")
        good = 0
        bad: list[str] = []
        for i in range(1, spec.n + 1):
            files = self.xnat.outputs(spec.project, i, spec.resource)
            if want <= files.keys() and (md5 is None or files["files.txt"] == md5):
                good += 1
            elif len(bad) < 3:
                bad.append(f"{session_label(i)}: {sorted(files)}")
        result.uploaded = good
        if good != spec.n:
            result.errors.append(
                f"{spec.n - good} of {spec.n} scans lack their outputs in XNAT, e.g. "
                + "; ".join(bad)
            )

    def sshd_accepted(self, ports: list[int]) -> str:
        """How many of these client ports sshd's log shows an accepted login from."""
        if self.cluster is None:
            return ""
        log = Path(self.cluster["dir"]) / "sshd.log"
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return "sshd log unreadable"
        seen = set(map(int, re.findall(r"Accepted publickey for \S+ from \S+ port (\d+)", text)))
        return f"sshd accepted {sum(1 for p in ports if p in seen)} of {len(ports)}"

    # ---------------------------------------------------------------------------------------
    def hpcbridge(self, spec: Spec) -> Result:
        result = Result(spec)
        recipe_args = ["--recipes", str(self.recipes)] if spec.recipe != "dcm2niix" else []
        command = ["run", spec.recipe, spec.project, *recipe_args]

        # Planning as a user sees it: the dry run, a command of its own, in a home of its own
        # (its cached XNAT session would otherwise be reused by the run and hide the run's).
        dry_home = self.work / f"home-dry-{spec.key}"
        self.profile(spec, dry_home)
        before = self.xnat.stats()
        dry = run_child(
            [sys.executable, "-m", "hpcbridge", *command, "--dry-run"],
            env=self.env(dry_home),
            timeout=self.timeout(spec),
            log=self.logs / f"{spec.key}-dry.err",
        )
        result.dry_run_requests = delta(before, self.xnat.stats()).requests
        if dry.returncode != 0:
            result.errors.append(f"dry run exited {dry.returncode}: {tail(dry.stderr)}")
        result.dry_run_s = dry.wall

        home = self.work / f"home-{spec.key}"
        self.profile(spec, home)
        out = self.work / f"counters-{spec.key}.json"
        env = {**self.env(home), "BENCH_RUNS_OUT": str(out)}
        argv = [sys.executable, "-c", CHILD, *command, "--wait"]
        argv += ["--interval", str(self.args.interval)]
        before = self.xnat.stats()
        child = run_child(
            argv, env=env, timeout=self.timeout(spec), log=self.logs / f"{spec.key}.err"
        )
        after = self.xnat.stats()
        result.wall = child.wall
        result.xnat = delta(before, after)
        if child.timed_out:
            result.errors.append(f"timed out after {self.timeout(spec):g} s")
            self.cancel_run(env)
        elif child.returncode != 0:
            result.errors.append(f"exited {child.returncode}: {tail(child.stderr)}")
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            data = {}
            result.errors.append("the run wrote no counters")
        module = str(data.get("module", ""))
        if data and not module.startswith(str(self.source) + os.sep):
            result.errors.append(f"the run imported hpcbridge from {module}, not {self.source}")
        self.read_counters(spec, result, data)
        self.check_outputs(spec, result)
        self.judge(result)
        return result

    def read_counters(self, spec: Spec, result: Result, data: dict[str, Any]) -> None:
        if not data:
            return
        passes = data.get("passes", [])
        polled = [p for p in passes if p["polled"]]
        result.passes = len(passes)
        result.polls = len(polled)
        # A pass's status calls, as the scheduler object counts them and as commands run (qstat,
        # squeue) through the transport: the larger of the two, in the busiest pass.
        per_pass = [max(p["status_calls"], p["status_commands"]) for p in passes]
        result.status_max = max(per_pass, default=0)
        result.plan_s = data.get("plan_s") or float("nan")
        result.stage_submit_ms = mean_ms(data.get("submit_one", []))
        result.submit_ms = mean_ms(data.get("submit_script", []))
        result.stage_in_ms = mean_ms(data.get("stage_in", []))
        result.stage_out_ms = mean_ms(data.get("stage_out", []))
        result.sync_s = sum(p["seconds"] for p in passes)
        result.transport_ops = int(data.get("transport_ops", 0))
        result.http = dict(data.get("http", {}))
        result.ops = dict(data.get("ops", {}))
        result.record_reads_max = max((p["record_reads"] for p in passes), default=0)
        if spec.target != "local":
            result.ssh = int(data.get("ssh_connections", 0))
            result.ssh_checked = self.sshd_accepted(list(data.get("ssh_ports", [])))
        counts = data.get("final_counts", {})
        if counts.get("uploaded", 0) != spec.n:
            result.errors.append(f"the ledger's final counts: {counts}")

    def judge(self, result: Result) -> None:
        """The COUNT targets of issue 8; only hpcbridge rows are held to them."""
        spec = result.spec
        if result.xnat is not None and result.xnat.sessions != 1:
            result.broken.append(f"{result.xnat.sessions} XNAT sessions (target 1)")
        if spec.target != "local" and result.ssh != 1:
            result.broken.append(f"{result.ssh} SSH connections (target 1)")
        if result.status_max is not None and result.status_max > 1:
            result.broken.append(f"{result.status_max} status calls in one poll (target 1)")
        if result.errors:
            result.broken.append("not every scan uploaded: " + result.errors[0])

    def cancel_run(self, env: dict[str, str]) -> None:
        """A run that timed out: cancel its jobs, by the ids its ledger holds."""
        subprocess.run(
            [sys.executable, "-m", "hpcbridge", "cancel", "--run", "1"],
            env=env,
            cwd=self.work,
            capture_output=True,
            timeout=300,
            check=False,
        )

    # ---------------------------------------------------------------------------------------
    def naive(self, spec: Spec) -> Result:
        result = Result(spec)
        folder = self.work / f"naive-{spec.key}"
        mode = "qsub" if spec.target == "pbs" else "bash"
        script_args = [
            str(self.netrc),
            self.xnat.url,
            spec.project,
            str(folder),
            mode,
            str(self.args.interval),
            spec.recipe,
            spec.resource,
        ]
        if spec.target == "local":
            argv = ["bash", str(self.naive_sh), *script_args]
            stdin = None
        else:
            assert self.cluster is not None
            # Logged in on the login node once, the loop runs there (the cluster shares this
            # machine, so the netrc and the work folder are the same paths on both sides).
            ssh = self.cluster["ssh"]
            argv = ["ssh", "-F", ssh["ssh_config"], ssh["alias"], "bash", "-s", "--"]
            argv += script_args
            stdin = self.naive_sh
        before = self.xnat.stats()
        child = run_child(
            argv,
            env=dict(self.base_env),
            timeout=self.timeout(spec),
            log=self.logs / f"{spec.key}.err",
            stdin=stdin,
        )
        after = self.xnat.stats()
        result.wall = child.wall
        result.xnat = delta(before, after)
        values: dict[str, str] = {}
        for line in child.stdout.splitlines():
            if line.startswith("BENCH "):
                _, key, *rest = line.split(" ", 2)
                values[key] = rest[0] if rest else ""
        if child.timed_out:
            result.errors.append(f"timed out after {self.timeout(spec):g} s")
            ids = values.get("job_ids", "").split()
            if mode == "qsub" and ids:
                self.qdel(ids)
        elif child.returncode != 0:
            result.errors.append(f"exited {child.returncode}: {tail(child.stderr)}")
        nums = {k: int(v) for k, v in values.items() if v.lstrip("-").isdigit()}
        result.naive = nums
        n = max(nums.get("scans", spec.n), 1)
        result.plan_s = nums.get("list_us", 0) / 1e6
        result.stage_submit_ms = nums.get("stage_submit_us", 0) / 1e3 / n
        result.submit_ms = nums.get("submit_us", 0) / 1e3 / n
        if mode == "qsub":
            result.status_max = nums.get("max_calls")
            result.polls = nums.get("cycles", 0)
        if spec.target != "local":
            result.ssh = 1
            port = values.get("ssh", "").split()
            ports = [int(port[1])] if len(port) >= 2 and port[1].isdigit() else []
            result.ssh_checked = self.sshd_accepted(ports)
        if nums.get("failed"):
            result.errors.append(f"{nums['failed']} downloads, submissions or uploads failed")
        self.check_outputs(spec, result)
        return result

    def qdel(self, ids: list[str]) -> None:
        assert self.cluster is not None
        ssh = self.cluster["ssh"]
        subprocess.run(
            ["ssh", "-F", ssh["ssh_config"], ssh["alias"], "qdel", *ids],
            capture_output=True,
            timeout=120,
            check=False,
        )


# -- reporting -----------------------------------------------------------------------------------
def fmt_load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # None or nan
        return "–"
    return f"{x:.{digits}f}"


def main_table(results: list[Result]) -> str:
    lines = [
        "| where | tool | scans | XNAT sessions (left open) | SSH connections "
        "| status calls per poll, max (polls) | HTTP requests | per scan | plan s "
        "| stage-in + submit ms/job | submit ms/job | wall s | wall ms/scan | uploaded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r.spec
        tool = s.tool if s.recipe == "bench-ls" else f"{s.tool} ({s.recipe})"
        if s.tool == "naive":
            tool = {
                "local": "naive: curl + unzip + `bash job &`",
                "pbs": "naive: curl + unzip + qsub",
            }[s.target] + (" (dcm2niix)" if s.recipe == "dcm2niix" else "")
        sessions = f"{r.xnat.sessions} ({r.xnat.left_open})" if r.xnat else "–"
        ssh = "–" if r.ssh is None else str(r.ssh)
        if r.status_max is None:
            status = "– (`wait`)" if s.tool == "naive" else "–"
        else:
            status = f"{r.status_max} ({r.polls})"
        requests_ = str(r.xnat.requests) if r.xnat else "–"
        uploaded = f"{r.uploaded}/{s.n}" + (" **" + "; ".join(r.broken) + "**" if r.broken else "")
        if r.errors and not r.broken:
            uploaded += " (" + r.errors[0][:120] + ")"
        lines.append(
            f"| {s.where} | {tool} | {s.n} | {sessions} | {ssh} | {status} | {requests_} "
            f"| {fmt(r.per_scan, 1)} | {fmt(r.plan_s)} | {fmt(r.stage_submit_ms, 1)} "
            f"| {fmt(r.submit_ms, 1)} | {fmt(r.wall, 1)} | {fmt(r.wall / s.n * 1000, 0)} "
            f"| {uploaded} |"
        )
    return "\n".join(lines)


def hpcbridge_table(results: list[Result]) -> str:
    lines = [
        "| where | recipe | scans | dry run s | dry-run requests | plan s | stage-in ms/job "
        "| submit ms/job | stage-out ms/job | sync passes | time in passes s "
        "| transport calls per scan | job-record reads, max per pass | requests by method "
        "| SSH check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        s = r.spec
        if s.tool != "hpcbridge":
            continue
        methods = ", ".join(f"{m} {c}" for m, c in r.xnat.by_method.items()) if r.xnat else "–"
        lines.append(
            f"| {s.where} | {s.recipe} | {s.n} | {fmt(r.dry_run_s)} | {r.dry_run_requests} "
            f"| {fmt(r.plan_s)} | {fmt(r.stage_in_ms, 1)} | {fmt(r.submit_ms, 1)} "
            f"| {fmt(r.stage_out_ms, 1)} | {r.passes} | {fmt(r.sync_s, 1)} "
            f"| {fmt(r.transport_ops / s.n, 1)} | {r.record_reads_max} | {methods} "
            f"| {r.ssh_checked or '–'} |"
        )
    return "\n".join(lines)


def naive_table(results: list[Result]) -> str:
    lines = [
        "| where | recipe | scans | listing s | download + unzip + submit s | wait s | upload s "
        "| status calls (cycles) | uploads | requests by method | SSH check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        s = r.spec
        if s.tool != "naive":
            continue
        v = r.naive
        methods = ", ".join(f"{m} {c}" for m, c in r.xnat.by_method.items()) if r.xnat else "–"
        calls = f"{v.get('status_calls', 0)} ({v.get('cycles', 0)})" if s.target != "local" else "–"
        lines.append(
            f"| {s.where} | {s.recipe} | {s.n} | {fmt(v.get('list_us', 0) / 1e6)} "
            f"| {fmt(v.get('stage_submit_us', 0) / 1e6, 1)} | {fmt(v.get('wait_us', 0) / 1e6, 1)} "
            f"| {fmt(v.get('upload_us', 0) / 1e6, 1)} | {calls} | {v.get('uploads', 0)} "
            f"| {methods} | {r.ssh_checked or '–'} |"
        )
    return "\n".join(lines)


def http_table(result: Result) -> str:
    n = result.spec.n
    lines = [
        f"| request (names and ids as `*`) | count, {n} scans | per scan |",
        "|---|---:|---:|",
    ]
    for key, count in sorted(result.http.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| `{key}` | {count} | {count / n:.2f} |")
    total = sum(result.http.values())
    lines.append(f"| all | {total} | {total / n:.2f} |")
    return "\n".join(lines)


def ops_table(results: list[Result]) -> str:
    rows = [r for r in results if r.spec.tool == "hpcbridge" and r.ops]
    lines = [
        "| where | scans | transport call | count | per scan | mean ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for kind, (count, seconds) in sorted(r.ops.items(), key=lambda kv: -kv[1][1]):
            lines.append(
                f"| {r.spec.where} | {r.spec.n} | `{kind}` | {int(count)} "
                f"| {count / r.spec.n:.2f} | {seconds / count * 1000:.1f} |"
            )
    return "\n".join(lines)


def machine_line(source: Path) -> str:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return (
            (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""
        )

    curl = first_line(["curl", "--version"]).split(" (")[0]
    slurm = first_line(["sinfo", "--version"])
    commit = first_line(["git", "-C", str(source), "describe", "--always", "--dirty"])
    if not (source / ".git").exists():
        commit = str(source)  # an export (git archive) says what it is by its name
    return (
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{curl or 'curl ?'}, {slurm or 'no Slurm'}, hpcbridge: {commit or '?'}"
    )


# -- main ----------------------------------------------------------------------------------------
def parse_counts(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("scan counts must be at least 1")
    return values


def load_cluster(path: str) -> tuple[dict[str, Any] | None, str]:
    try:
        data: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return None, f"no CI cluster ({path}: {exc})"
    if not data.get("ready"):
        return None, f"the CI cluster is not ready ({path})"
    return data, ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scans", type=parse_counts, default=[10], help="scan counts (10)")
    ap.add_argument("--cluster", action="store_true", help="add the CI cluster's rows")
    ap.add_argument(
        "--cluster-scans",
        type=parse_counts,
        help="scan counts for the cluster rows (default: those of --scans up to 100)",
    )
    ap.add_argument(
        "--tools",
        default="hpcbridge,naive",
        help="which rows: hpcbridge, naive or both (default both)",
    )
    ap.add_argument("--dcm2niix", action="store_true", help="add rows with the real dcm2niix")
    ap.add_argument("--dcm2niix-scans", type=parse_counts, default=[10], help="(10)")
    ap.add_argument("--slices", type=int, default=2, help="DICOM files per scan (2)")
    ap.add_argument("--interval", type=float, default=0.5, help="poll interval, s (0.5)")
    ap.add_argument("--max-sessions", type=int, default=100_000, help="sandbox limit (100000)")
    ap.add_argument("--row-timeout", type=float, help="seconds per row (default: from N)")
    ap.add_argument("--out", type=Path, help="append the Markdown report to this file")
    ap.add_argument("--tmpdir", type=Path, help="where the files go (default: system tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument(
        "--source",
        type=Path,
        default=REPO,
        help="the hpcbridge tree to measure, e.g. a `git archive` export (default: this one)",
    )
    args = ap.parse_args(argv)
    if args.slices < 1 or args.interval <= 0:
        ap.error("--slices and --interval must be positive")
    tools = {t.strip() for t in args.tools.split(",") if t.strip()}
    if not tools or not tools <= {"hpcbridge", "naive"}:
        ap.error("--tools takes hpcbridge, naive or both")
    for tool in ("curl", "unzip", "bash"):
        if not shutil.which(tool):
            print(f"{tool} is needed for the naive rows", file=sys.stderr)
            return 2
    if args.dcm2niix and not shutil.which("dcm2niix"):
        print("--dcm2niix needs dcm2niix on PATH", file=sys.stderr)
        return 2

    cluster = None
    if args.cluster:
        cluster, why = load_cluster(os.environ.get("HPCBRIDGE_TEST_CLUSTER", CLUSTER_JSON))
        if cluster is None:
            print(f"{why}: leaving out the cluster rows", file=sys.stderr)
    cluster_scans = args.cluster_scans or [n for n in args.scans if n <= 100] or [min(args.scans)]

    specs: list[Spec] = []
    for n in sorted(set(args.scans) | (set(cluster_scans) if cluster else set())):
        if n in args.scans:
            specs += [
                Spec("local", "hpcbridge", "bench-ls", n, args.slices),
                Spec("local", "naive", "bench-ls", n, args.slices),
            ]
        if cluster and n in cluster_scans:
            specs += [
                Spec("pbs", "hpcbridge", "bench-ls", n, args.slices),
                Spec("slurm", "hpcbridge", "bench-ls", n, args.slices),
                Spec("pbs", "naive", "bench-ls", n, args.slices),
            ]
    if args.dcm2niix:
        for n in args.dcm2niix_scans:
            specs += [
                Spec("local", "hpcbridge", "dcm2niix", n, 12),
                Spec("local", "naive", "dcm2niix", n, 12),
            ]
    specs = [s for s in specs if s.tool in tools]

    # A SIGTERM ends the run through the finally below: the server stopped, the folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = Path(args.tmpdir or tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="hpcbridge-bench-runs-", dir=base))
    os.chmod(work, 0o755)  # the cluster's jobs (root, here) read the work folders in it
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCBRIDGE_", "XNAT"))}
    source = args.source.resolve()
    if not (source / "hpcbridge" / "__init__.py").is_file():
        print(f"--source {source} holds no hpcbridge package", file=sys.stderr)
        return 2
    base_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p
    )
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    ok = False
    try:
        t0 = time.perf_counter()
        seed(work / "server-data", [(s.project, s.n, s.slices) for s in specs])
        total = sum(s.n for s in specs)
        print(f"seeded {total} scans in {len(specs)} projects in {time.perf_counter() - t0:.1f} s")
        proc, info = start_sandbox(work, base_env, args.max_sessions)
        pid = int(info["pid"])
        print(f"sandbox pid {pid} at {info['url']}", flush=True)
        xnat = Xnat(info)
        bench = Bench(work, xnat, base_env, args, cluster, source)
        results: list[Result] = []
        load_before = os.getloadavg()
        for spec in specs:
            print(f"-- {spec.key} ({spec.where}) ...", flush=True)
            result = bench.hpcbridge(spec) if spec.tool == "hpcbridge" else bench.naive(spec)
            results.append(result)
            print(
                f"   wall {result.wall:.1f} s, sessions "
                f"{result.xnat.sessions if result.xnat else '?'}, requests "
                f"{result.xnat.requests if result.xnat else '?'}, ssh {result.ssh}, status max "
                f"{result.status_max}, uploaded {result.uploaded}/{spec.n}"
                + (f", ERRORS: {result.errors}" if result.errors else ""),
                flush=True,
            )
        broken = [r for r in results if r.broken]
        stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        if broken:
            verdict = "**Counts: targets missed** — " + "; ".join(
                f"{r.spec.key}: {', '.join(r.broken)}" for r in broken
            )
        elif any(r.spec.tool == "hpcbridge" for r in results):
            verdict = (
                "**Counts: every hpcbridge row met its targets** (1 XNAT session per run, at "
                "most 1 SSH connection, at most 1 scheduler status call per poll, every scan "
                "uploaded)."
            )
        else:
            verdict = "**Counts: no hpcbridge rows in this run.**"
        report = (
            f"### Runs of {', '.join(str(n) for n in sorted({s.n for s in specs}))} scans "
            f"({stamp})\n\n"
            f"Machine: {machine_line(source)}\n\n"
            f"Load average (1, 5, 15 min) at the start {fmt_load(load_before)}, at the end "
            f"{fmt_load(os.getloadavg())}.\n\n"
            f"Poll interval {args.interval} s, {args.slices} DICOM files per scan (12 for "
            f"dcm2niix), max_queued 50 (the default), sandbox --max-sessions "
            f"{args.max_sessions}.\n\n"
            f"{main_table(results)}\n\n"
        )
        if any(r.spec.tool == "hpcbridge" for r in results):
            report += (
                f"hpcbridge, where the time and the calls go:\n\n{hpcbridge_table(results)}\n\n"
            )
        if any(r.spec.tool == "naive" for r in results):
            report += f"The naive loop, phase by phase:\n\n{naive_table(results)}\n\n"
        largest = max(
            (r for r in results if r.spec.tool == "hpcbridge" and r.http),
            key=lambda r: (r.spec.target == "local", r.spec.n),
            default=None,
        )
        if largest is not None:
            report += (
                f"hpcbridge's requests ({largest.spec.where}, {largest.spec.recipe}, "
                f"{largest.spec.n} scans), as the run process sent them:\n\n"
                f"{http_table(largest)}\n\n"
            )
        remote = [r for r in results if r.spec.target != "local"]
        if remote:
            report += (
                "hpcbridge's calls through the SSH transport (commands and SFTP), by kind:\n\n"
                f"{ops_table(remote)}\n\n"
            )
        report += f"{verdict}\n"
        print()
        print(report)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as fh:
                fh.write(report + "\n")
        ok = not broken
        return 0 if ok else 1
    except (BenchFailure, requests.RequestException, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_server(proc, pid)
        log_path = work / "server.log"
        if not ok and log_path.exists():
            print(
                "--- end of the sandbox's log ---\n"
                + tail(log_path.read_text(errors="replace"), 2000),
                file=sys.stderr,
            )
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
