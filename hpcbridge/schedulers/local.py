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
from pathlib import Path
from typing import Any

from hpcbridge.credentials import scrubbed_environ
from hpcbridge.errors import SchedulerError
from hpcbridge.processes import pid_alive
from hpcbridge.schedulers.base import JobStatus, Scheduler, State
from hpcbridge.schedulers.checks import check_ids
from hpcbridge.schedulers.script import ScriptInfo, walltime_seconds
from hpcbridge.transport import LocalTransport, Transport
from hpcbridge.units import utc_stamp

__all__ = ["LocalScheduler", "array_indices", "job_search_path"]

_ID = re.compile(r"^\d+$")
_ARRAY = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_THROTTLE = re.compile(r"^[1-9]\d*$")
_MAX_ARRAY = 10_000


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
        return check_ids("local", _ID, ids)

    def log_paths(self, native_id: str, info: ScriptInfo) -> tuple[str | None, str | None]:
        spec = _read_json(self.root / native_id / "job.json") or {}
        return spec.get("stdout", info.stdout), spec.get("stderr", info.stderr)

    def _next_id(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        counter = self.root / "next_id"
        with _locked(self.root / ".lock"):
            try:
                last = int(counter.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                last = 0
            native_id = str(last + 1)
            _write_text(counter, native_id)
        return native_id

    def _submit(
        self, script_path: str, after: list[str], array: str | None, info: ScriptInfo
    ) -> str:
        script = Path(script_path)
        if not script.is_file():
            raise SchedulerError(f"no job script at {script}")
        after = self.check_ids(after)
        for dep in after:
            self._check_dependency(dep)
        indices = array_indices(array) if array else []
        native_id = self._next_id()
        job_dir = self.root / native_id
        job_dir.mkdir()
        spec = self._spec(native_id, script, after, indices, info)
        # The job is published (job.json, which status, find_jobs and cancel read) only once its
        # runner's pid is on record: a submitter killed before then leaves no job that anyone
        # would adopt or wait for, and its runner, if it started, gives up (_localrun.run_job).
        _write_json(job_dir / PENDING_SPEC, spec)
        _write_json(job_dir / "state.json", {"state": "queued", "submitted": spec["submitted"]})
        if not after:
            # In line for a slot from now on, so jobs start in the order they were submitted
            # whichever runner process happens to start first.
            _enter_line(self.root, native_id)
        pid = self._start_runner(job_dir)
        # Only the runner writes state.json; its pid goes to a file of its own.
        _write_text(job_dir / "runner.pid", str(pid))
        os.replace(job_dir / PENDING_SPEC, job_dir / "job.json")
        return native_id

    def _check_dependency(self, dep: str) -> None:
        if not (self.root / dep / "job.json").is_file():
            raise SchedulerError(f"cannot depend on job {dep}: the local scheduler never ran it")
        dep_state, dep_raw = _job_state(self.root / dep)
        if dep_raw in ("failed", "cancelled", "lost") or (
            dep_raw == "finished" and dep_state.get("exit_code") not in (None, 0)
        ):
            raise SchedulerError(
                f"job {dep} already {'failed' if dep_raw == 'lost' else dep_raw}; "
                "a job after it would never run"
            )

    def _spec(
        self, native_id: str, script: Path, after: list[str], indices: list[int], info: ScriptInfo
    ) -> dict[str, Any]:
        logs_dir = Path(info.state_dir) if info.state_dir else self.root / native_id
        return {
            "id": native_id,
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

    def _start_runner(self, job_dir: Path) -> int:
        """The pid of the job's runner (:mod:`._localrun`), started in a session of its own."""
        try:
            with open(job_dir / "runner.log", "ab") as log_fh:
                return subprocess.Popen(
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
                ).pid
        except OSError as exc:
            _leave_line(self.root, job_dir.name)
            _write_json(job_dir / "state.json", {"state": "failed", "reason": str(exc)})
            raise SchedulerError(f"cannot start the local job runner: {exc}") from None

    def _status_of(self, native_id: str) -> JobStatus | None:
        job_dir = self.root / native_id
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
            native_id=native_id,
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
        for native_id in self.check_ids(ids):
            status = self._status_of(native_id)
            if status is not None:
                found[native_id] = status
        return found

    def cancel(self, ids: Sequence[str]) -> list[str]:
        unknown: list[str] = []
        for native_id in self.check_ids(ids):
            job_dir = self.root / native_id
            if not (job_dir / "job.json").is_file():
                unknown.append(native_id)
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


def _enter_line(root: Path, native_id: str) -> None:
    (root / "waiting").mkdir(exist_ok=True)
    (root / "waiting" / native_id).touch()


def _leave_line(root: Path, native_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / "waiting" / native_id).unlink()
