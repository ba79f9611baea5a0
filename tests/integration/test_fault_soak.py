"""A fault soak (issue 15): one run of about 50 scans is synced to its end while faults are
injected at random, and at the end every scan is uploaded exactly once.

The faults, drawn from a seeded random generator:

- the sandbox XNAT answers every Nth request 503 (sometimes with a Retry-After), cuts every Nth
  body (upload or download) part-way through, and answers late;
- the sandbox is restarted on the same port and data folder, stopped gently (SIGTERM) or killed
  (SIGKILL), after a random downtime;
- the syncing process is killed with SIGKILL at a random moment;
- a scheduler command fails now and then: the poll cannot reach the scheduler, a submission is
  refused with "cannot connect", a submission's answer is lost after the scheduler took the job
  (a timed-out qsub), the look-up of a job by its name fails;
- two syncs are started at once.

Each episode draws its faults first (so the seed alone fixes the schedule), then starts one or
two `hpcbridge sync 1` processes (a single pass or `--watch`) and applies the faults while they
run. The scheduler faults are injected inside the sync processes by a wrapper around the local
scheduler (`SYNC_CHILD`: the same CLI entry point, with `LocalScheduler.status`, `submit` and
`find_jobs` made flaky), so the product code is what runs. After the fault phase (bounded by a
deadline and a number of episodes) the faults are cleared and a plain `sync 1 --watch` ends the
run. Then:

- `status --json` says the run is done and every scan uploaded, with no attempt, error or wait
  left, and the ledger's events show each scan submitted once and uploaded once, never failed;
- the local scheduler ran exactly one job per scan (no duplicate submission);
- each scan's resource in XNAT holds exactly the recipe's two files with the md5s predicted
  from its DICOM, plus the provenance file, and nothing else (no `a`-suffixed or renamed
  duplicates, no other resource); the ledger's record of the upload matches XNAT's listing;
- the run's lock is gone and no sync printed a traceback.

The seed is printed; set ``HPCBRIDGE_SOAK_SEED`` to replay a schedule (the interleaving with
the processes' timing differs from run to run, the faults and their order do not).
``tests/benchmarks/bench_fault_soak.py`` runs the longer variant with the same engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests

from hpcbridge.ledger import Ledger
from hpcbridge.outputs import PROVENANCE_FILE
from hpcbridge.sandbox import SandboxServer
from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files
from hpcbridge.sandbox.store import Store

SEED_ENV = "HPCBRIDGE_SOAK_SEED"
# Read at import: the isolated_home fixture clears every HPCBRIDGE_* variable for each test.
SEED_GIVEN = os.environ.get(SEED_ENV)

PROJECT = "SOAK"
SCAN_ID = "4"
SCAN_TYPE = "Ax 3D T1"
RESOURCE = "SOAK"
ADMIN = ("admin", "admin")
T = 10.0  # seconds for one HTTP request of the soak itself
OUTPUTS = ("inputs.txt", "who.txt")
PASS_LINE = re.compile(r"^run 1: \d+/\d+ ended", re.MULTILINE)

RECIPE = """
name = "soak"
description = "writes who the scan is and the md5s of its DICOM files"
version = "1"

[inputs]
resource = "DICOM"
scan_types = ["*"]

[[outputs]]
glob = "*.txt"
resource = "SOAK"

[run]
command = '''
echo {{ scan.project }} {{ scan.subject }} {{ scan.experiment }} {{ scan.id }} \\
    > {{ output_dir }}/who.txt
cd {{ input_dir }} && md5sum -- *.dcm | LC_ALL=C sort -k 2 > {{ output_dir }}/inputs.txt
'''
"""

# The sync process: the same CLI entry point as `hpcbridge`, with the local scheduler's commands
# failing now and then as a cluster's do. SOAK_SCHEDULER_FAULTS is "seed:rate:tally-file"; each
# injected fault appends its kind to the tally file (so faults of killed processes count too).
SYNC_CHILD = r"""
import os, random, sys
from hpcbridge.errors import SchedulerError, TransportError
from hpcbridge.schedulers.local import LocalScheduler

seed, rate, tally = os.environ["SOAK_SCHEDULER_FAULTS"].split(":", 2)
rng, rate = random.Random(seed), float(rate)

def note(kind):
    with open(tally, "a") as fh:
        fh.write(kind + "\n")

status, submit, find_jobs = LocalScheduler.status, LocalScheduler.submit, LocalScheduler.find_jobs

def flaky_status(self, ids):
    if rng.random() < rate:
        note("scheduler: poll failed")
        raise TransportError("`squeue -h -j ...` did not finish within 60 s (soak fault)")
    return status(self, ids)

def flaky_submit(self, *args, **kwargs):
    roll = rng.random()
    if roll < rate / 2:
        note("scheduler: submission refused")
        raise SchedulerError("qsub: cannot connect to server pbs01 (soak fault)")
    job_id = submit(self, *args, **kwargs)
    if roll < rate:
        note("scheduler: submission's answer lost")
        raise TransportError("`qsub job.sh` did not finish within 60 s (soak fault)")
    return job_id

def flaky_find_jobs(self, **kwargs):
    if rng.random() < rate:
        note("scheduler: look-up failed")
        raise TransportError("`qselect -N ...` did not finish within 60 s (soak fault)")
    return find_jobs(self, **kwargs)

if rate > 0:
    LocalScheduler.status = flaky_status
    LocalScheduler.submit = flaky_submit
    LocalScheduler.find_jobs = flaky_find_jobs

from hpcbridge.cli import main
main(sys.argv[1:], prog_name="hpcbridge")
"""


class SoakFailure(AssertionError):
    """The soak found the product wrong (or could not drive it); the message names the seed."""


@dataclass
class SoakConfig:
    scans: int = 50
    max_queued: int = 10
    #: the fault phase ends after this many seconds or episodes, or when the run has ended
    fault_seconds: float = 70.0
    max_episodes: int = 40
    #: the clean `sync --watch` after the faults must end the run within this
    finish_seconds: float = 90.0
    #: a single pass (`sync 1`) that takes longer than this is killed and reported
    pass_limit: float = 40.0
    episode_seconds: tuple[float, float] = (1.0, 4.0)
    #: choices per episode (equal odds for each entry)
    fail_every: tuple[int, ...] = (0, 0, 4, 7, 15, 30)
    drop_every: tuple[int, ...] = (0, 0, 3, 6, 12)
    drop_after: tuple[int, ...] = (0, 16, 300, 1500)
    latency: tuple[float, ...] = (0.0, 0.0, 0.0, 0.01, 0.05)
    retry_after: tuple[int, ...] = (0, 0, 0, 0, 0, 1)
    scheduler_rate: tuple[float, ...] = (0.0, 0.05, 0.15, 0.3)
    p_two_syncs: float = 0.3
    p_watch: float = 0.3
    p_kill: float = 0.35
    p_restart: float = 0.2


@dataclass
class Episode:
    """One episode's faults, all drawn before it starts."""

    faults: dict[str, Any]
    scheduler_rate: float
    syncs: list[str]  # "pass" or "watch", started together
    seconds: float
    kill: tuple[float, int] | None  # (when, which sync)
    restart: tuple[float, str, float] | None  # (when, "TERM" or "KILL", downtime)

    @classmethod
    def draw(cls, rng: random.Random, cfg: SoakConfig, force: str | None = None) -> Episode:
        """An episode's faults; ``force`` (one of KINDS) makes sure that kind is among them.
        Every value is drawn whatever is forced, so a seed always gives the same schedule."""
        faults = {
            "fail_every": rng.choice(cfg.fail_every),
            "drop_every": rng.choice(cfg.drop_every),
            "drop_after": rng.choice(cfg.drop_after),
            "latency": rng.choice(cfg.latency),
            "retry_after": rng.choice(cfg.retry_after),
        }
        rate = rng.choice(cfg.scheduler_rate)
        count = 2 if rng.random() < cfg.p_two_syncs else 1
        syncs = ["watch" if rng.random() < cfg.p_watch else "pass" for _ in range(2)]
        seconds = rng.uniform(*cfg.episode_seconds)
        kill_at, victim = rng.uniform(0.1, seconds), rng.randrange(2)
        kill = (kill_at, victim) if rng.random() < cfg.p_kill else None
        when, how, down = (
            rng.uniform(0.0, seconds),
            rng.choice(["TERM", "KILL"]),
            rng.uniform(0, 1.5),
        )
        restart = (when, how, down) if rng.random() < cfg.p_restart else None
        some = {
            "503": rng.choice([n for n in cfg.fail_every if n] or [0]),
            "cut": rng.choice([n for n in cfg.drop_every if n] or [0]),
            "latency": rng.choice([n for n in cfg.latency if n] or [0]),
            "scheduler": rng.choice([n for n in cfg.scheduler_rate if n] or [0]),
        }
        if force == "503" and not faults["fail_every"]:
            faults["fail_every"] = some["503"]
        elif force == "cut" and not faults["drop_every"]:
            faults["drop_every"] = some["cut"]
        elif force == "latency" and not faults["latency"]:
            faults["latency"] = some["latency"]
        elif force == "scheduler" and not rate:
            rate = some["scheduler"]
        elif force == "two":
            count = 2
        elif force == "kill" and kill is None:
            kill = (kill_at, victim)
        elif force == "restart" and restart is None:
            restart = (when, how, down)
        if kill is not None and kill[1] >= count:
            kill = (kill[0], 0)
        return cls(faults, rate, syncs[:count], seconds, kill, restart)


#: The kinds of fault the first episodes make sure of, one each, in an order the seed shuffles.
KINDS = ("503", "cut", "latency", "scheduler", "two", "kill", "restart")


def subject_label(i: int) -> str:
    return f"S{i:03d}"


def session_label(i: int) -> str:
    return f"S{i:03d}_MR1"


def scan_address(i: int) -> str:
    return f"{PROJECT}/{subject_label(i)}/{session_label(i)}/{SCAN_ID}"


def series_of(i: int) -> list[tuple[str, bytes]]:
    """Scan i's DICOM: a small series of its own, so that no two scans' outputs are alike."""
    return series_files(
        SeriesSpec(int(SCAN_ID), SCAN_TYPE, n_slices=2, rows=16, cols=16),
        patient_id=f"SOAK{i:03d}",
        patient_name="Soak^Faults",
        study_uid=make_uid("fault-soak", str(i)),
    )


def expected_outputs(i: int, series: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """What the recipe writes for scan i: its identity, and `md5sum` of its DICOM, sorted."""
    who = f"{PROJECT} {subject_label(i)} {session_label(i)} {SCAN_ID}\n"
    sums = "".join(f"{hashlib.md5(blob).hexdigest()}  {name}\n" for name, blob in sorted(series))
    return {"who.txt": who.encode(), "inputs.txt": sums.encode()}


def seed_archive(data_dir: Path, scans: int) -> dict[int, list[tuple[str, bytes]]]:
    """N subjects with one MR session and one scan 4 each, straight into the sandbox's store."""
    store = Store(data_dir)
    series: dict[int, list[tuple[str, bytes]]] = {}
    try:
        store.create_project(PROJECT, ADMIN[0], name="fault soak", secondary_id=PROJECT)
        for i in range(1, scans + 1):
            subject = store.create_subject(PROJECT, subject_label(i), ADMIN[0])
            session = store.create_experiment(
                PROJECT,
                subject["id"],
                session_label(i),
                "xnat:mrSessionData",
                ADMIN[0],
                date="2024-01-02",
            )
            scan = store.put_scan(
                session["id"],
                SCAN_ID,
                "xnat:mrScanData",
                type=SCAN_TYPE,
                series_description=SCAN_TYPE,
                frames="2",
            )
            res = store.create_resource(
                "scan", str(scan["pk"]), "DICOM", format="DICOM", content="RAW"
            )
            series[i] = series_of(i)
            for name, blob in series[i]:
                store.add_file(res["id"], name, store.spool(iter([blob])), overwrite=True)
    finally:
        store.close()
    return series


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Sandbox:
    """`hpcbridge sandbox serve` as a process of its own, restartable on its port and data."""

    def __init__(self, work: Path, data: Path, env: dict[str, str]) -> None:
        self.work, self.data, self.env = work, data, env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.auth = ADMIN
        #: counters of the sandbox lifetimes that ended, and of the soak's own requests
        self.earlier: Counter[str] = Counter()
        self.own: Counter[str] = Counter()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = self.work / f"ready-{self.starts}.json"
        argv = [sys.executable, "-m", "hpcbridge", "sandbox", "serve", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--data", str(self.data), "--ready-file", str(ready)]
        with open(self.work / "sandbox.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env, cwd=self.work
            )
        self.starts += 1
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None:
                raise SoakFailure(f"the sandbox exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise SoakFailure("the sandbox was not ready within 60 s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.port = int(info["url"].rsplit(":", 1)[1])

    def stop(self, how: str = "TERM") -> None:
        """Stop it (SIGTERM, or SIGKILL as a crash), keeping its counters first."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(SoakFailure):
                self.update_faults(fail_every=0, drop_every=0, latency=0, retry_after=0)
                stats = self.stats()
                self.earlier["503"] += stats["statuses"].get("503", 0)
                self.earlier["cuts"] += stats.get("cuts", 0)
                self.earlier["requests"] += sum(stats["requests"].values())
            self.proc.send_signal(signal.SIGKILL if how == "KILL" else signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc = None
        self.http.cookies.clear()  # the sessions died with the server

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """The soak's own request: tried again while the faults refuse it."""
        for _ in range(40):
            try:
                resp = self.http.request(method, self.url + path, timeout=T, **kwargs)
            except requests.ConnectionError:
                self.own["cuts"] += 1
                continue
            if resp.status_code == 503:
                self.own["503"] += 1
                continue
            resp.raise_for_status()
            data: dict[str, Any] = resp.json()
            return data
        raise SoakFailure(f"the sandbox refused {method} {path} 40 times")

    def update_faults(self, **faults: Any) -> None:
        self._call("POST", "/sandbox/faults", data=json.dumps(faults))

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/sandbox/stats")

    def totals(self) -> Counter[str]:
        """503s answered and bodies cut over every lifetime, less the soak's own."""
        now = Counter(self.earlier)
        if self.proc is not None and self.proc.poll() is None:
            self.update_faults(fail_every=0, drop_every=0, latency=0, retry_after=0)
            stats = self.stats()
            now["503"] += stats["statuses"].get("503", 0)
            now["cuts"] += stats.get("cuts", 0)
            now["requests"] += sum(stats["requests"].values())
        now.subtract(self.own)
        return now

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("TERM")
        self.http.close()


@dataclass
class SyncProcess:
    proc: subprocess.Popen[bytes]
    mode: str
    log: Path
    started: float = field(default_factory=time.monotonic)
    killed: bool = False
    noted: bool = False


@dataclass
class SoakResult:
    seed: int
    scans: int
    episodes: int = 0
    syncs: int = 0
    passes: int = 0  # sync passes that got to the end (each prints `run 1: N/M ended ...`)
    faults: Counter[str] = field(default_factory=Counter)
    exit_codes: Counter[int] = field(default_factory=Counter)
    fault_phase_s: float = 0.0
    finish_s: float = 0.0
    wall_s: float = 0.0
    uploaded_in_fault_phase: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        verdict = "PASS" if self.ok else f"FAIL ({len(self.problems)} problem(s))"
        return (
            f"fault soak seed {self.seed}: {self.scans} scans, {self.episodes} episodes, "
            f"{self.syncs} sync processes, {self.passes} passes, "
            f"{self.uploaded_in_fault_phase} uploaded under faults; "
            f"faults: {kinds}; fault phase {self.fault_phase_s:.1f} s, finish "
            f"{self.finish_s:.1f} s, wall {self.wall_s:.1f} s: {verdict}"
        )


class Soak:
    """The soak's engine, shared by the test and the benchmark."""

    def __init__(self, root: Path, cfg: SoakConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.rng = random.Random(seed)
        self.root = root
        self.home = root / "home"
        self.work = root / "soak"
        self.logs = self.work / "logs"
        self.tally = self.work / "scheduler-faults.txt"
        self.result = SoakResult(seed, cfg.scans)
        self.syncs: list[SyncProcess] = []
        self.series: dict[int, list[tuple[str, bytes]]] = {}
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("HPCBRIDGE_") and k not in ("XNAT_HOST", "XNAT_USER", "XNAT_PASS")
        }
        self.base_env = dict(base, PYTHONUNBUFFERED="1")
        self.sandbox = Sandbox(self.work, self.work / "sandbox-data", self.base_env)

    # -- set-up ----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return dict(
            self.base_env,
            HPCBRIDGE_HOME=str(self.home),
            HPCBRIDGE_XNAT=self.sandbox.url,
            HPCBRIDGE_USER=ADMIN[0],
            HPCBRIDGE_PASSWORD=ADMIN[1],
        )

    def set_up(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.series = seed_archive(self.work / "sandbox-data", self.cfg.scans)
        recipes = self.work / "recipes"
        recipes.mkdir()
        (recipes / "soak.toml").write_text(RECIPE)
        # Short backoffs: a run waits seconds, not the default 30 s doubling to 30 minutes.
        (self.home / "config.toml").write_text(
            '[profiles.default]\nscheduler = "local"\nretry_interval = 0.2\nretry_max = 1.0\n'
        )
        self.sandbox.start()
        started = self.hb(
            "run", "soak", PROJECT, "--recipes", str(recipes), "--max-queued",
            str(self.cfg.max_queued),
        )  # fmt: skip
        if started.returncode != 0 or started.stdout.strip() != "1":
            raise SoakFailure(f"the run did not start: {started.stdout}{started.stderr}")

    def hb(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hpcbridge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.work,
        )

    # -- the fault phase -------------------------------------------------------------------
    def start_sync(self, mode: str, rate: float, tag: str) -> SyncProcess:
        args = ["sync", "1"] + (["--watch", "--interval", "0.2"] if mode == "watch" else [])
        env = dict(self.env(), SOAK_SCHEDULER_FAULTS=f"{self.seed}-{tag}:{rate}:{self.tally}")
        log = self.logs / f"sync-{len(self.syncs) + 1}-{mode}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-c", SYNC_CHILD, *args],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=fh,
                env=env,
                cwd=self.work,
            )
        sync = SyncProcess(proc, mode, log)
        self.syncs.append(sync)
        self.result.syncs += 1
        return sync

    def kill(self, sync: SyncProcess) -> None:
        """SIGKILL, by its pid, if it still runs (a process that ended is not killed)."""
        if sync.proc.poll() is None:
            sync.proc.send_signal(signal.SIGKILL)
            sync.killed = True
            self.result.faults["bridge killed (SIGKILL)"] += 1
        sync.proc.wait(timeout=15)
        self.note_end(sync)

    def note_end(self, sync: SyncProcess) -> None:
        if not sync.killed and not sync.noted:
            self.result.exit_codes[sync.proc.returncode] += 1
        sync.noted = True

    def episode(self, n: int, ep: Episode) -> None:
        res = self.result
        with open(self.work / "episodes.jsonl", "a") as fh:  # what was drawn, for a replay
            fh.write(json.dumps({"episode": n, **ep.__dict__}) + "\n")
        self.sandbox.update_faults(**ep.faults)
        if ep.faults["fail_every"]:
            res.faults["episodes with 503s"] += 1
        if ep.faults["drop_every"]:
            res.faults["episodes with cut bodies"] += 1
        if ep.faults["latency"]:
            res.faults["episodes with latency"] += 1
        if len(ep.syncs) == 2:
            res.faults["two syncs at once"] += 1
        running = [
            self.start_sync(mode, ep.scheduler_rate, f"{n}.{i}") for i, mode in enumerate(ep.syncs)
        ]
        t0 = time.monotonic()
        kill, restart = ep.kill, ep.restart
        while True:
            now = time.monotonic() - t0
            if kill is not None and now >= kill[0]:
                self.kill(running[kill[1]])
                kill = None
            if restart is not None and now >= restart[0]:
                _, how, down = restart
                self.sandbox.stop(how)
                res.faults[f"sandbox restarted (SIG{how})"] += 1
                time.sleep(down)
                self.sandbox.start()
                self.sandbox.update_faults(**ep.faults)
                restart = None
            passes = [s for s in running if s.mode == "pass" and s.proc.poll() is None]
            if now >= ep.seconds and kill is None and restart is None and not passes:
                break
            for s in passes:
                if time.monotonic() - s.started > self.cfg.pass_limit:
                    res.problems.append(
                        f"a single `sync 1` pass ran for more than {self.cfg.pass_limit:g} s "
                        f"(episode {n}; killed; log {s.log})"
                    )
                    self.kill(s)
            time.sleep(0.05)
        for s in running:
            if s.mode == "watch":
                self.kill(s)  # a --watch still running at the episode's end is killed -9
            else:
                s.proc.wait(timeout=15)
                self.note_end(s)

    def run_state(self) -> str:
        with Ledger(self.home / "ledger.sqlite") as ledger:
            return str(ledger.run(1).state.value)

    def uploaded_count(self) -> int:
        with Ledger(self.home / "ledger.sqlite") as ledger:
            return int(ledger.counts(1).get("uploaded", 0))

    def fault_phase(self) -> None:
        t0 = time.monotonic()
        cfg = self.cfg
        forced = list(KINDS)
        self.rng.shuffle(forced)
        for n in range(1, cfg.max_episodes + 1):
            if time.monotonic() - t0 > cfg.fault_seconds or self.run_state() != "active":
                break
            force = forced[n - 1] if n <= len(forced) else None
            self.episode(n, Episode.draw(self.rng, cfg, force))
            self.result.episodes = n
        self.result.fault_phase_s = time.monotonic() - t0
        self.result.uploaded_in_fault_phase = self.uploaded_count()

    def finish(self) -> None:
        """No more faults: a plain `sync --watch` ends the run."""
        if self.sandbox.proc is None or self.sandbox.proc.poll() is not None:
            self.sandbox.start()
        totals = self.sandbox.totals()  # also clears the faults
        t0 = time.monotonic()
        try:
            done = self.hb(
                "sync", "1", "--watch", "--interval", "0.2", timeout=self.cfg.finish_seconds
            )
        except subprocess.TimeoutExpired:
            self.result.problems.append(
                f"the run did not end within {self.cfg.finish_seconds:g} s once the faults "
                f"stopped: {self.describe_unfinished()}"
            )
            return
        finally:
            self.result.finish_s = time.monotonic() - t0
        (self.logs / "finish.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            self.result.problems.append(
                f"the last `sync 1 --watch` exited {done.returncode}: {done.stderr[-2000:]}"
            )
        self.result.faults["503 answered"] = totals["503"]
        self.result.faults["bodies cut"] = totals["cuts"]
        for line in self.tally.read_text().splitlines() if self.tally.exists() else []:
            self.result.faults[line] += 1

    def describe_unfinished(self) -> str:
        with Ledger(self.home / "ledger.sqlite") as ledger:
            rows = [j for j in ledger.jobs(1) if j.state.value != "uploaded"]
            return "; ".join(
                f"{j.address}: {j.state.value} {j.extra.get('waiting') or j.last_error or ''}"
                for j in rows[:10]
            )

    # -- the verdict -----------------------------------------------------------------------
    def check(self) -> None:
        problems = self.result.problems
        status = self.hb("--json", "status", "1")
        if status.returncode != 0:
            problems.append(f"status --json exited {status.returncode}: {status.stderr}")
            return
        data = json.loads(status.stdout)
        if data["run"]["state"] != "done":
            problems.append(f"the run is {data['run']['state']}, not done")
        jobs = {j["scan"]: j for j in data["jobs"]}
        wanted = {scan_address(i): i for i in range(1, self.cfg.scans + 1)}
        if sorted(jobs) != sorted(wanted):
            problems.append(
                f"the run's scans are not the project's: {sorted(set(jobs) ^ set(wanted))}"
            )
        for scan, job in sorted(jobs.items()):
            if job["state"] != "uploaded" or job["attempts"] or job["error"] or job["waiting"]:
                problems.append(
                    f"{scan}: {job['state']} (attempts {job['attempts']}, error {job['error']!r},"
                    f" waiting {job['waiting']!r})"
                )
        with Ledger(self.home / "ledger.sqlite") as ledger:
            for row in ledger.jobs(1):
                events = [e.to_state.value for e in ledger.events(row.job_id)]
                if events.count("submitted") != 1 or events.count("uploaded") != 1:
                    problems.append(f"{row.address}: events {events}")
                elif "failed" in events or "cancelled" in events:
                    problems.append(f"{row.address}: failed on the way: {events}")
        self.check_scheduler(jobs)
        self.check_xnat(jobs, wanted)
        lock = self.home / "locks" / "run-1.lock"
        if lock.exists():
            problems.append(f"the run's lock is left behind: {lock.read_text()!r}")
        finish = self.logs / "finish.log"
        if finish.exists():
            self.result.passes += len(PASS_LINE.findall(finish.read_text(errors="replace")))
        for sync in self.syncs:
            text = sync.log.read_text(errors="replace")
            self.result.passes += len(PASS_LINE.findall(text))
            if "Traceback" in text:
                problems.append(f"{sync.log.name} printed a traceback:\n{text[-3000:]}")
            if sync.proc.returncode == 3:
                problems.append(f"{sync.log.name} exited 3 (a run ended with failed scans)")

    def check_scheduler(self, jobs: dict[str, dict[str, Any]]) -> None:
        """One local job per scan: nothing was submitted twice, whatever was killed when."""
        root = self.home / "local-jobs"
        specs = [json.loads(p.read_text()) for p in root.glob("*/job.json")]
        dirs = Counter(s["work_dir"] for s in specs)
        twice = sorted(d for d, n in dirs.items() if n > 1)
        if len(specs) != len(jobs) or twice:
            self.result.problems.append(
                f"the scheduler ran {len(specs)} jobs for {len(jobs)} scans; submitted more "
                f"than once: {twice[:5]}"
            )
        ids = sorted(str(j["job_id"]) for j in jobs.values())
        if ids != sorted(str(s["id"]) for s in specs):
            self.result.problems.append("the ledger's job ids are not the scheduler's")

    def check_xnat(self, jobs: dict[str, dict[str, Any]], wanted: dict[str, int]) -> None:
        problems = self.result.problems
        http = requests.Session()
        http.auth = ADMIN
        try:
            for scan, i in sorted(wanted.items()):
                base = (
                    f"{self.sandbox.url}/data/projects/{PROJECT}/subjects/{subject_label(i)}"
                    f"/experiments/{session_label(i)}/scans/{SCAN_ID}/resources"
                )
                resp = http.get(base, params={"format": "json"}, timeout=T)
                resp.raise_for_status()
                labels = sorted(r["label"] for r in resp.json()["ResultSet"]["Result"])
                if labels != ["DICOM", RESOURCE]:
                    problems.append(f"{scan}: resources {labels}")
                listing = self.listing(http, f"{base}/{RESOURCE}/files")
                expected = {
                    name: hashlib.md5(blob).hexdigest()
                    for name, blob in expected_outputs(i, self.series[i]).items()
                }
                if sorted(listing) != sorted([*OUTPUTS, PROVENANCE_FILE]):
                    problems.append(f"{scan}: {RESOURCE} holds {sorted(listing)}")
                    continue
                got = {name: listing[name][1] for name in OUTPUTS}
                if got != expected:
                    problems.append(f"{scan}: md5s {got}, expected {expected}")
                prov_bytes = http.get(f"{base}/{RESOURCE}/files/{PROVENANCE_FILE}", timeout=T)
                prov_bytes.raise_for_status()
                if hashlib.md5(prov_bytes.content).hexdigest() != listing[PROVENANCE_FILE][1]:
                    problems.append(f"{scan}: the provenance file's md5 is not XNAT's digest")
                prov = prov_bytes.json()
                if prov.get("run") != 1 or prov.get("files") != list(OUTPUTS):
                    problems.append(f"{scan}: provenance {prov}")
                dicom = self.listing(http, f"{base}/DICOM/files")
                seeded = {n: (len(b), hashlib.md5(b).hexdigest()) for n, b in self.series[i]}
                if dicom != seeded:
                    problems.append(f"{scan}: DICOM now {dicom}")
                recorded = {
                    u["name"]: (u["size"], u["md5"])
                    for u in jobs.get(scan, {}).get("uploaded") or []
                    if u.get("resource") == RESOURCE
                }
                if recorded != listing:
                    problems.append(f"{scan}: the ledger says {recorded}, XNAT lists {listing}")
        finally:
            http.close()

    @staticmethod
    def listing(http: requests.Session, url: str) -> dict[str, tuple[int, str]]:
        resp = http.get(url, params={"format": "json"}, timeout=T)
        if resp.status_code == 404:  # no such resource
            return {}
        resp.raise_for_status()
        rows = resp.json()["ResultSet"]["Result"]
        names = [r["Name"] for r in rows]
        listed = {r["Name"]: (int(r["Size"]), r["digest"]) for r in rows}
        if len(names) != len(listed):  # the same name twice
            listed["(duplicate names)"] = (len(names), ",".join(sorted(names)))
        return listed

    # -- the whole soak --------------------------------------------------------------------
    def run(self) -> SoakResult:
        t0 = time.monotonic()
        try:
            self.set_up()
            self.fault_phase()
            self.finish()
            self.check()
        finally:
            self.result.wall_s = time.monotonic() - t0
            self.close()
        return self.result

    def close(self) -> None:
        """End what the soak started, each by its pid: syncs, the local jobs, the sandbox."""
        for sync in self.syncs:
            if sync.proc.poll() is None:
                sync.proc.send_signal(signal.SIGKILL)
                sync.proc.wait(timeout=15)
        stop_local_jobs(self.home / "local-jobs")
        self.sandbox.close()


def stop_local_jobs(root: Path, timeout: float = 30.0) -> None:
    """Cancel every job the local scheduler under ``root`` ran and wait for its runner."""
    from hpcbridge.schedulers.local import LocalScheduler

    ids = [p.name for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    if not ids:
        return
    LocalScheduler(root).cancel(ids)
    deadline = time.monotonic() + timeout
    for job_id in ids:
        pid_file = root / job_id / "runner.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def soak_seed() -> int:
    """The seed asked for in HPCBRIDGE_SOAK_SEED, or a new one."""
    if SEED_GIVEN:
        return int(SEED_GIVEN)
    return random.SystemRandom().randrange(1, 10**9)


# --- the tests -------------------------------------------------------------------------------


def test_the_sandbox_counts_the_bodies_its_faults_cut(tmp_path: Path) -> None:
    """The soak counts cut bodies from the sandbox's stats: they must count real cuts only."""
    with SandboxServer(tmp_path / "data") as server, requests.Session() as http:
        http.auth = ADMIN
        assert http.put(f"{server.url}/data/projects/P1", timeout=T).status_code in (200, 201)
        url = f"{server.url}/data/projects/P1/resources/R/files/f.txt"
        server.faults.update({"drop_every": 2, "drop_after": 10})
        for n in range(4):  # transfers 1 and 3 pass, 2 and 4 are cut after 10 bytes
            try:
                http.put(url, params={"inbody": "true"}, data=b"x" * 100, timeout=T)
            except requests.ConnectionError:
                assert n % 2 == 1
        assert server.stats.snapshot()["cuts"] == 2
        server.faults.update({"drop_after": 1000})  # a body shorter than the cut point passes
        for _ in range(2):
            http.put(url, params={"inbody": "true"}, data=b"x" * 100, timeout=T)
        assert server.stats.snapshot()["cuts"] == 2


def test_a_run_synced_through_random_faults_uploads_every_scan_exactly_once(
    tmp_path: Path,
) -> None:
    seed = soak_seed()
    print(f"fault soak: seed {seed} (replay with {SEED_ENV}={seed})")
    soak = Soak(tmp_path, SoakConfig(), seed)
    result = soak.run()
    print(result.summary())
    assert result.ok, (
        f"[{SEED_ENV}={seed}] " + result.summary() + "\n" + "\n".join(result.problems[:30])
    )
    # Every kind of fault was injected, and some scans were uploaded while they were.
    kinds = result.faults
    assert kinds["503 answered"] > 0 and kinds["bodies cut"] > 0, kinds
    assert kinds["bridge killed (SIGKILL)"] > 0, kinds
    assert kinds["sandbox restarted (SIGTERM)"] + kinds["sandbox restarted (SIGKILL)"] > 0, kinds
    assert sum(n for k, n in kinds.items() if k.startswith("scheduler:")) > 0, kinds
    assert kinds["two syncs at once"] > 0 and kinds["episodes with latency"] > 0, kinds
    assert result.uploaded_in_fault_phase > 0, result.summary()


# A bridge killed inside the local scheduler's submission, after the job's folder and its place
# in line were written and before its runner's pid was: the soak's SIGKILL can land there.
CRASH_IN_SUBMIT = r"""
import os, signal, subprocess, sys
from pathlib import Path
from hpcbridge.schedulers.local import LocalScheduler

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

subprocess.Popen = killed
LocalScheduler(Path(sys.argv[1])).submit(sys.argv[2])
"""


CRASH_AFTER_RUNNER = r"""
import os, signal, sys
from pathlib import Path
from hpcbridge.schedulers import local

write = local._write_text

def write_then_die(path, text):
    write(path, text)
    if Path(path).name == "runner.pid":
        os.kill(os.getpid(), signal.SIGKILL)

local._write_text = write_then_die
local.LocalScheduler(Path(sys.argv[1])).submit(sys.argv[2])
"""


def test_a_runner_whose_submission_never_completed_runs_nothing(tmp_path: Path) -> None:
    from hpcbridge.schedulers.local import LocalScheduler

    root = tmp_path / "local-jobs"
    marker = tmp_path / "ran"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\ntouch {marker}\n")
    try:
        crashed = subprocess.run(
            [sys.executable, "-c", CRASH_AFTER_RUNNER, str(root), str(script)], timeout=60
        )
        assert crashed.returncode == -signal.SIGKILL
        pid = int((root / "1" / "runner.pid").read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        # The runner saw its submitter die before publishing the job, and left at once.
        assert not _alive(pid)
        assert not marker.exists() and not (root / "1" / "job.json").exists()
        assert LocalScheduler(root).find_jobs(name="job") == []
    finally:
        stop_local_jobs(root, timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A runner that exited but was not yet reaped by init counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


def test_a_bridge_killed_inside_a_local_submission_leaves_no_job_that_blocks_the_rest(
    tmp_path: Path,
) -> None:
    from hpcbridge.schedulers.local import LocalScheduler

    root = tmp_path / "local-jobs"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho done\n")
    try:
        crashed = subprocess.run(
            [sys.executable, "-c", CRASH_IN_SUBMIT, str(root), str(script)], timeout=60
        )
        assert crashed.returncode == -signal.SIGKILL
        # Killed before its runner was on record: the job was never published, so no later
        # sync adopts it (it would wait for it forever) and it holds no place in the line.
        assert not (root / "1" / "job.json").exists() and (root / "waiting" / "1").exists()
        scheduler = LocalScheduler(root)
        assert scheduler.find_jobs(name="job") == []
        os.utime(root / "1", (time.time() - 60, time.time() - 60))  # past STARTING_GRACE
        second = scheduler.submit(str(script))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = scheduler.status(["1", second])
            if all(s.state.is_final for s in states.values()):
                break
            time.sleep(0.1)
        states = scheduler.status(["1", second])
        # The next job runs; the one whose submission never completed is no job at all.
        assert states[second].state.value == "finished", states
        assert "1" not in states or states["1"].state.is_final, states
    finally:
        stop_local_jobs(root, timeout=10)
