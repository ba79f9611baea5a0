"""The local scheduler's per-job runner process (``python -m hpcbridge.schedulers._localrun
JOB_DIR PID``, PID the submitting process's): it waits for the job's dependencies and a free
slot, runs the script, enforces the walltime and records each state change (see :mod:`.local`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcbridge.credentials import scrubbed_environ
from hpcbridge.schedulers.local import (
    STARTING_GRACE,
    _enter_line,
    _job_state,
    _leave_line,
    _read_json,
    _runner_alive,
    _write_json,
    job_search_path,
)
from hpcbridge.units import utc_stamp

__all__ = ["run_job"]

_KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL, as PBS and Slurm do by default


def _first_in_line(root: Path, native_id: str) -> bool:
    """True when no job submitted earlier is still waiting for a slot."""
    me = int(native_id)
    for entry in (root / "waiting").iterdir():
        if not entry.name.isdigit() or int(entry.name) >= me:
            continue
        if _runner_alive(root / entry.name):
            return False
        _leave_line(root, entry.name)  # its runner died: it will never take a slot
    return True


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


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
