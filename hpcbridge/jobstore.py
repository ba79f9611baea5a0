"""Job records: what hpcbridge knows about each submitted job, one JSON file per job under
``$HPCBRIDGE_HOME/jobs/<profile>/``, ended ones under ``ended/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SchedulerError
from .schedulers.base import State

__all__ = ["Job", "JobStore"]


@dataclass
class Job:
    """What hpcbridge knows about one submitted job; ``native_id`` is the scheduler's id."""

    native_id: str
    scheduler: str
    host: str
    script: str
    work_dir: str | None
    name: str
    submitted: str
    after: list[str] = field(default_factory=list)
    array: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    state: str = State.QUEUED.value
    raw_state: str = ""
    exit_code: int | None = None
    end: str | None = None
    reason: str = ""
    log_tail: str = ""
    ended_seen: float | None = None  # when the scheduler first said ended with no status file

    @property
    def final(self) -> bool:
        return State(self.state).is_final

    @property
    def state_dir(self) -> str | None:
        return f"{self.work_dir}/.hpcbridge" if self.work_dir else None

    def to_json(self) -> dict[str, Any]:
        """The record as ``jobs --json`` prints it."""
        data = self.stored()
        data.pop("ended_seen")
        return data

    def stored(self) -> dict[str, Any]:
        """The record as its file holds it; there, as in ``jobs --json``, the scheduler's id
        keeps the name "id" it had before ``native_id``."""
        data = asdict(self)
        return {"id": data.pop("native_id"), **data}


def _safe_name(native_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\[\]-]", "_", native_id)


class JobStore:
    """One JSON file per job, per profile (job ids are only unique per cluster).

    Records of jobs that ended go to ``ended/``: a profile's history grows without end, and
    what every submission and poll needs is the jobs still live (a busy work folder, afterok
    children to cancel). ``live()`` reads the live records once per store object and keeps
    its own saves in step, since a run submits and polls many jobs through one store; ``all()``
    adds the ended ones, for listings. ``get()`` always reads the file, for the freshest view.
    """

    def __init__(self, home: Path, profile: str) -> None:
        self.dir = Path(home) / "jobs" / _safe_name(profile)
        self.ended_dir = self.dir / "ended"
        self._live: dict[str, Job] | None = None

    def _path(self, native_id: str, *, ended: bool) -> Path:
        return (self.ended_dir if ended else self.dir) / f"{_safe_name(native_id)}.json"

    def save(self, job: Job) -> None:
        path = self._path(job.native_id, ended=job.final)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(job.stored(), indent=1) + "\n")
        os.replace(tmp, path)
        if job.final:
            self._path(job.native_id, ended=False).unlink(missing_ok=True)
        if self._live is not None:
            self._live.pop(job.native_id, None)  # the latest saved last, as on disk
            if not job.final:
                self._live[job.native_id] = job

    def get(self, native_id: str) -> Job | None:
        for ended in (False, True):
            job = self._read(self._path(native_id, ended=ended), native_id)
            if job is not None:
                return job
        return None

    def _read(self, path: Path, native_id: str) -> Job | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise SchedulerError(
                f"cannot read the record of job {native_id} ({path}): {exc}"
            ) from None
        known = {f.name for f in fields(Job)}
        if "id" in data:
            data["native_id"] = data.pop("id")
        return Job(**{k: v for k, v in data.items() if k in known})

    def _load(self, folder: Path, *, since: float | None = None) -> list[tuple[float, Job]]:
        """(time of last change, job) for the records in ``folder``, oldest change first
        (those changed after ``since`` only)."""
        stamped = []
        for path in folder.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):
                mtime = path.stat().st_mtime
                if since is None or mtime >= since:
                    stamped.append((mtime, path))
        jobs = []
        for mtime, path in sorted(stamped):
            with contextlib.suppress(SchedulerError):
                job = self._read(path, path.stem)
                if job is not None:
                    jobs.append((mtime, job))
        return jobs

    def live(self) -> list[Job]:
        """Every job that has not ended, oldest change first."""
        if self._live is None:
            self._live = {}
            for _mtime, job in self._load(self.dir):
                if job.final:  # recorded before ended/ existed: file it there now
                    self.save(job)
                else:
                    self._live[job.native_id] = job
        return list(self._live.values())

    def all(self, *, ended_since: float | None = None) -> list[Job]:
        """Every job, oldest change first; of the ended ones only those whose record changed
        after ``ended_since`` (a time.time()) when given."""
        merged = [(mtime, 1, job) for mtime, job in self._load(self.ended_dir, since=ended_since)]
        for job in self.live():
            try:
                mtime = self._path(job.native_id, ended=False).stat().st_mtime
            except FileNotFoundError:
                mtime = float("inf")  # saved by this store and not on disk: the newest
            merged.append((mtime, 0, job))
        return [job for _mtime, _order, job in sorted(merged, key=lambda t: (t[0], t[1]))]
