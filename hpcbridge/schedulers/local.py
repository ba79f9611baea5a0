"""The embedded scheduler: job scripts run as background processes on this machine.

It exists so that the whole flow works with no cluster at all (``hpcbridge demo``, laptops,
tests), with the same scripts, states and commands as PBS and Slurm. Each submitted job gets a
small runner process in its own session, so jobs keep running after the CLI exits; the runner
waits for the job's dependencies and for a free slot (one of ``max_jobs`` lock files), runs the
script, enforces the walltime and records every state change in ``<root>/<id>/state.json``.
Status and cancel read and write those files; no daemon is needed.

Layout under ``root`` (``$HPCBRIDGE_HOME/local-jobs`` by default)::

    next_id            the last id issued (guarded by an flock on .lock)
    slots/N.lock       held (flock) by the runner of a running job
    waiting/ID         a job ready to run and waiting for a slot; the lowest id goes first
    ID/job.json        what was submitted: script, dependencies, array, logs, walltime
    ID/state.json      queued | running | finished | failed | cancelled, pid, exit code, times
    ID/cancel          present once cancellation was asked for
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcbridge.credentials import scrubbed_environ
from hpcbridge.errors import SchedulerError
from hpcbridge.processes import pid_alive
from hpcbridge.schedulers.base import JobStatus, Scheduler, State
from hpcbridge.schedulers.script import ScriptInfo, walltime_seconds
from hpcbridge.transport import LocalTransport, Transport
from hpcbridge.units import utc_stamp

__all__ = ["LocalScheduler", "array_indices", "job_search_path", "run_job"]

_ID = re.compile(r"^\d+$")
_ARRAY = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_THROTTLE = re.compile(r"^[1-9]\d*$")
_MAX_ARRAY = 10_000
_KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL, as PBS and Slurm do by default


def job_search_path() -> str:
    """The PATH local jobs run with: this one, after the folder of the Python running hpcbridge.

    Tools installed beside this Python (pip's dcm2niix) are then found even when its
    environment was not activated, as they would be for a job of the activated shell.
    """
    path = os.environ.get("PATH", "")
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir in path.split(os.pathsep):
        return path
    return os.pathsep.join(p for p in (bin_dir, path) if p)


def array_indices(spec: str) -> list[int]:
    """``1-10``, ``1-10:2``, ``1,3,5`` or a mix; a ``%N`` throttle suffix is checked, then ignored
    (the local scheduler runs an array's tasks one after another)."""
    indices: list[int] = []
    ranges, percent, throttle = spec.partition("%")
    if percent and not _THROTTLE.match(throttle.strip()):
        raise SchedulerError(
            f"invalid array range {spec!r}: the %N throttle needs a positive whole number"
        )
    for part in ranges.split(","):
        match = _ARRAY.match(part.strip())
        if not match:
            raise SchedulerError(f"invalid array range {spec!r} (use e.g. 1-10, 1-10:2 or 1,3,5)")
        start = int(match.group(1))
        stop = int(match.group(2) or start)
        step = int(match.group(3) or 1)
        if stop < start or step < 1:
            raise SchedulerError(f"invalid array range {spec!r}")
        span = range(start, stop + 1, step)
        # Count before building the list: a typo like 1-1000000000 must not exhaust memory.
        if len(indices) + len(span) > _MAX_ARRAY:
            raise SchedulerError(f"array range {spec!r} has more than {_MAX_ARRAY} tasks")
        indices += span
    return sorted(set(indices))


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` whole: a reader sees the old content or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=1))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


#: How long a job folder without a runner counts as a submission still under way. A submitter
#: killed in between leaves such a folder for good; past this it is given up.
STARTING_GRACE = 30.0

#: What a submission writes first; it becomes ``job.json`` once its runner's pid is on record.
PENDING_SPEC = "job.pending.json"


def _runner_alive(job_dir: Path) -> bool:
    try:
        pid = int((job_dir / "runner.pid").read_text().strip())
    except FileNotFoundError:
        # Submitted this instant (the pid is being written), or by a submitter that was killed
        # before it could write it: that job will never run, and must not hold the line.
        try:
            age = time.time() - job_dir.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < STARTING_GRACE
    except ValueError:
        return False
    return pid_alive(pid)


def _job_state(job_dir: Path) -> tuple[dict[str, Any], str]:
    """The job's state record and its raw state, ``lost`` when its runner died before the end.

    The runner is asked about before state.json is read: a runner records its final state and
    then exits, so reading first could pair a stale ``running`` with a runner that has just
    (correctly) exited, and report a healthy job as lost.
    """
    alive = _runner_alive(job_dir)
    state = _read_json(job_dir / "state.json") or {"state": "queued"}
    raw = str(state.get("state", "queued"))
    if raw in ("queued", "running") and not alive:
        # The runner died (reboot, OOM killer, kill -9): nothing will finish this job.
        raw = "lost"
    return state, raw


class LocalScheduler(Scheduler):
    """Background processes on this machine, at most ``max_jobs`` running at once."""

    kind = "local"

    def __init__(
        self, root: Path, *, max_jobs: int | None = None, transport: Transport | None = None
    ) -> None:
        transport = transport or LocalTransport()
        if not isinstance(transport, LocalTransport):
            raise SchedulerError(
                "the local scheduler runs jobs on this machine only",
                hint="set `host` only together with scheduler = pbs or slurm",
            )
        super().__init__(transport)
        self.root = Path(root)
        self.max_jobs = max(1, max_jobs or os.cpu_count() or 1)

    def check_ids(self, ids: Sequence[str]) -> list[str]:
        bad = [i for i in ids if not _ID.match(i)]
        if bad:
            raise SchedulerError(f"not local job ids: {', '.join(map(repr, bad))}")
        return list(ids)

    def log_paths(self, job_id: str, info: ScriptInfo) -> tuple[str | None, str | None]:
        spec = _read_json(self.root / job_id / "job.json") or {}
        return spec.get("stdout", info.stdout), spec.get("stderr", info.stderr)

    def _next_id(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        counter = self.root / "next_id"
        with _locked(self.root / ".lock"):
            try:
                last = int(counter.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            job_id = str(last + 1)
            _write_text(counter, job_id)
        return job_id

    def submit(
        self,
        script_path: str,
        *,
        after: Sequence[str] = (),
        array: str | None = None,
        info: ScriptInfo | None = None,
    ) -> str:
        info = info or ScriptInfo()
        script = Path(script_path)
        if not script.is_file():
            raise SchedulerError(f"no job script at {script}")
        after = self.check_ids(after)
        for dep in after:
            if not (self.root / dep / "job.json").is_file():
                raise SchedulerError(
                    f"cannot depend on job {dep}: the local scheduler never ran it"
                )
            dep_state, dep_raw = _job_state(self.root / dep)
            if dep_raw in ("failed", "cancelled", "lost") or (
                dep_raw == "finished" and dep_state.get("exit_code") not in (None, 0)
            ):
                raise SchedulerError(
                    f"job {dep} already {'failed' if dep_raw == 'lost' else dep_raw}; "
                    "a job after it would never run"
                )
        indices = array_indices(array) if array else []
        job_id = self._next_id()
        job_dir = self.root / job_id
        job_dir.mkdir()
        logs_dir = Path(info.state_dir) if info.state_dir else job_dir
        spec = {
            "id": job_id,
            "script": str(script.absolute()),
            "work_dir": info.work_dir,
            "name": info.name or script.stem,
            "after": after,
            "array": indices,
            "stdout": info.stdout or str(logs_dir / "job.out"),
            "stderr": info.stderr or str(logs_dir / "job.err"),
            "walltime": walltime_seconds(info.walltime) if info.walltime else None,
            "max_jobs": self.max_jobs,
            "submitted": utc_stamp(),
        }
        # The job is published (job.json, which status, find_jobs and cancel read) only once its
        # runner's pid is on record: a submitter killed before then leaves no job that anyone
        # would adopt or wait for, and its runner, if it started, gives up (run_job).
        _write_json(job_dir / PENDING_SPEC, spec)
        _write_json(job_dir / "state.json", {"state": "queued", "submitted": spec["submitted"]})
        if not after:
            # In line for a slot from now on, so jobs start in the order they were submitted
            # whichever runner process happens to start first.
            _enter_line(self.root, job_id)
        try:
            with open(job_dir / "runner.log", "ab") as log_fh:
                runner = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "hpcbridge.schedulers._localrun",
                        str(job_dir),
                        str(os.getpid()),  # so the runner can tell its submitter died
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=log_fh,
                    start_new_session=True,  # survives the CLI and its terminal's signals
                    close_fds=True,
                    env=scrubbed_environ(),  # the runner's environment is the job's
                )
        except OSError as exc:
            _leave_line(self.root, job_id)
            _write_json(job_dir / "state.json", {"state": "failed", "reason": str(exc)})
            raise SchedulerError(f"cannot start the local job runner: {exc}") from None
        # Only the runner writes state.json; its pid goes to a file of its own.
        _write_text(job_dir / "runner.pid", str(runner.pid))
        os.replace(job_dir / PENDING_SPEC, job_dir / "job.json")
        return job_id

    def _status_of(self, job_id: str) -> JobStatus | None:
        job_dir = self.root / job_id
        spec = _read_json(job_dir / "job.json")
        if spec is None:
            return None
        state, raw = _job_state(job_dir)
        mapped = {
            "queued": State.QUEUED,
            "running": State.RUNNING,
            "finished": State.FINISHED,
            "failed": State.FAILED,
            "cancelled": State.CANCELLED,
        }.get(raw, State.UNKNOWN if raw != "lost" else State.FAILED)
        return JobStatus(
            native_id=job_id,
            state=mapped,
            raw_state=raw,
            exit_code=state.get("exit_code"),
            name=str(spec.get("name", "")),
            reason=str(
                state.get("reason", "") or ("the local runner died" if raw == "lost" else "")
            ),
            signal=state.get("signal"),
            killed_by=state.get("killed_by"),
            limit=state.get("limit"),
        )

    def status(self, ids: Sequence[str]) -> dict[str, JobStatus]:
        self.status_calls += 1
        found: dict[str, JobStatus] = {}
        for job_id in self.check_ids(ids):
            status = self._status_of(job_id)
            if status is not None:
                found[job_id] = status
        return found

    def cancel(self, ids: Sequence[str]) -> list[str]:
        unknown: list[str] = []
        for job_id in self.check_ids(ids):
            job_dir = self.root / job_id
            if not (job_dir / "job.json").is_file():
                unknown.append(job_id)
                continue
            (job_dir / "cancel").touch()
            state = _read_json(job_dir / "state.json") or {}
            pgid = state.get("pgid")
            if state.get("state") == "running" and pgid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pgid), signal.SIGTERM)
            elif state.get("state") == "queued" and not _runner_alive(job_dir):
                _write_json(
                    job_dir / "state.json",
                    dict(state, state="cancelled", reason="cancelled", end=utc_stamp()),
                )
        return unknown

    def find_jobs(self, *, name: str, work_dir: str | None = None) -> list[str]:
        # Local scripts carry no name directive: their work folder (unique per job) finds them.
        if not self.root.is_dir():
            return []
        found = []
        for job_dir in self.root.iterdir():
            spec = _read_json(job_dir / "job.json") if job_dir.name.isdigit() else None
            if spec and (
                spec.get("name") == name or (work_dir and spec.get("work_dir") == work_dir)
            ):
                found.append(job_dir.name)
        return sorted(found, key=int)


def _enter_line(root: Path, job_id: str) -> None:
    (root / "waiting").mkdir(exist_ok=True)
    (root / "waiting" / job_id).touch()


def _leave_line(root: Path, job_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / "waiting" / job_id).unlink()


def _first_in_line(root: Path, job_id: str) -> bool:
    """True when no job submitted earlier is still waiting for a slot."""
    me = int(job_id)
    for entry in (root / "waiting").iterdir():
        if not entry.name.isdigit() or int(entry.name) >= me:
            continue
        if _runner_alive(root / entry.name):
            return False
        _leave_line(root, entry.name)  # its runner died: it will never take a slot
    return True


# --- the runner: one per job, in its own session --------------------------------------------


@dataclass
class _Runner:
    job_dir: Path
    spec: dict[str, Any]
    poll: float = 0.2

    @property
    def root(self) -> Path:
        return self.job_dir.parent

    def record(self, **changes: Any) -> None:
        state = _read_json(self.job_dir / "state.json") or {}
        state.update(changes)
        _write_json(self.job_dir / "state.json", state)

    def cancelled(self) -> bool:
        return (self.job_dir / "cancel").exists()

    def wait_for_dependencies(self) -> str | None:
        """None when every dependency finished with exit 0, else why the job cannot run."""
        pending = list(self.spec.get("after", []))
        while pending:
            if self.cancelled():
                return "cancelled"
            for dep in list(pending):
                state, raw = _job_state(self.root / dep)
                if raw == "finished" and state.get("exit_code") == 0:
                    pending.remove(dep)
                elif raw == "lost":
                    return f"dependency {dep} did not succeed (its local runner died)"
                elif raw in ("finished", "failed", "cancelled"):
                    # PBS semantics: an afterok that can never hold deletes the job.
                    return f"dependency {dep} did not succeed ({raw})"
            if pending:
                time.sleep(self.poll)
        return None

    def take_slot(self) -> Any | None:
        """An open, flock-held slot file; the lock dies with this process.

        Jobs take slots in the order they became ready: a job waits while one submitted
        before it is still waiting for a slot.
        """
        slots = self.root / "slots"
        slots.mkdir(exist_ok=True)
        max_jobs = int(self.spec.get("max_jobs", 1))
        _enter_line(self.root, self.spec["id"])
        while not self.cancelled():
            if not _first_in_line(self.root, self.spec["id"]):
                time.sleep(self.poll)
                continue
            for n in range(max_jobs):
                fh = open(slots / f"{n}.lock", "a")  # noqa: SIM115 - held for the job's life
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    continue
                return fh
            time.sleep(self.poll)
        return None

    def run_task(self, index: int | None) -> tuple[int, str]:
        """Run the script once; return (exit code, reason)."""
        # Again here: the runner is an entry point of its own, started with any environment.
        env = dict(scrubbed_environ(), HPCBRIDGE_JOB_ID=self.spec["id"], PATH=job_search_path())
        env.pop("HPCBRIDGE_ARRAY_INDEX", None)
        if index is not None:
            env["HPCBRIDGE_ARRAY_INDEX"] = str(index)
        stdout, stderr = Path(self.spec["stdout"]), Path(self.spec["stderr"])
        stdout.parent.mkdir(parents=True, exist_ok=True)
        stderr.parent.mkdir(parents=True, exist_ok=True)
        cwd = self.spec.get("work_dir") or str(Path(self.spec["script"]).parent)
        Path(cwd).mkdir(parents=True, exist_ok=True)
        with open(stdout, "ab") as out, open(stderr, "ab") as err:
            proc = subprocess.Popen(
                ["bash", self.spec["script"]],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so cancel reaches children
            )
        self.record(state="running", pid=proc.pid, pgid=proc.pid, start=utc_stamp(), task=index)
        walltime = self.spec.get("walltime")
        deadline = time.monotonic() + walltime if walltime else None
        killed = ""
        while proc.poll() is None:
            if not killed and self.cancelled():
                killed = "cancelled"
            elif not killed and deadline is not None and time.monotonic() > deadline:
                killed = f"walltime {walltime} s exceeded"
                # Said before the kill, so whoever reads the job's status file sees why; the
                # limit as HH:MM:SS, the way recipes and PBS write it.
                hours, rest = divmod(int(walltime or 0), 3600)
                limit = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
                self.record(reason=killed, killed_by="walltime", limit=limit)
            if killed:
                _stop_group(proc)
                break
            time.sleep(self.poll)
        code = proc.wait()
        if not killed and code != 0 and self.cancelled():
            killed = "cancelled"  # `cancel` signalled the job itself before we looked
        return code, killed

    def main(self) -> int:
        try:
            why = self.wait_for_dependencies()
            if why is not None:
                self.record(state="cancelled", reason=why, end=utc_stamp())
                return 0
            slot = self.take_slot()
        finally:
            _leave_line(self.root, self.spec["id"])
        if slot is None:
            self.record(state="cancelled", reason="cancelled", end=utc_stamp())
            return 0
        try:
            # A new run starts new logs (as qsub and sbatch do): in a reused work folder the
            # last run's lines would otherwise pass for this run's log tail.
            for log_path in {self.spec["stdout"], self.spec["stderr"]}:
                with contextlib.suppress(OSError):
                    os.truncate(log_path, 0)
            tasks: list[int | None] = list(self.spec.get("array") or []) or [None]
            worst, reason = 0, ""
            for index in tasks:
                if self.cancelled():
                    reason = "cancelled"
                    break
                code, why_killed = self.run_task(index)
                if why_killed:
                    reason = why_killed
                if code != 0 and worst == 0:
                    worst = code
                if why_killed == "cancelled":
                    break
        finally:
            slot.close()
        exit_code = 128 + (-worst) if worst < 0 else worst
        if reason == "cancelled":
            self.record(state="cancelled", reason="cancelled", exit_code=exit_code, end=utc_stamp())
        else:
            self.record(
                state="finished" if exit_code == 0 and not reason else "failed",
                exit_code=exit_code,
                signal=-worst if worst < 0 else None,
                reason=reason,
                end=utc_stamp(),
            )
        return 0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=_KILL_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def run_job(job_dir: Path, submitter: int | None = None) -> int:
    """The runner's entry point (``python -m hpcbridge.schedulers._localrun JOB_DIR PID``,
    PID the submitting process's)."""
    # Published by the submitter right after it records our pid; a submitter killed before
    # that never publishes it, and then this job must not run. Its death shows as our being
    # handed to another parent; the deadline covers a submitter that hangs.
    submitter = os.getppid() if submitter is None else submitter
    deadline = time.monotonic() + STARTING_GRACE
    spec = _read_json(job_dir / "job.json")
    while spec is None and time.monotonic() < deadline:
        gone = os.getppid() != submitter
        time.sleep(0.05)
        spec = _read_json(job_dir / "job.json")
        if gone:
            break
    if spec is None:
        print(f"no job.json in {job_dir}: its submission never completed", file=sys.stderr)
        return 2
    return _Runner(job_dir, spec).main()
