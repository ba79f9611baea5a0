"""Submitted jobs: submit a script, poll every tracked job in one call, cancel, wait.

This is the layer between the scheduler back ends and the commands ``submit``, ``jobs`` and
``cancel``. It keeps one small JSON record per job under ``$HPCBRIDGE_HOME/jobs/<profile>/`` and
decides how each job ended from the status file its script writes (``status.json``, exit code and
end time), using the scheduler's view only while the job is alive or when the file is missing.
Rules it keeps:

- one scheduler status call per poll for all live jobs; a poll that fails changes nothing;
- a job whose afterok parent failed or was cancelled is cancelled here (Slurm would leave it
  pending forever);
- a failed job carries the last lines of its log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ConfigError, HpcBridgeError, SchedulerError, TransportError
from .schedulers.base import JobStatus, Scheduler, State, explain_kill
from .schedulers.local import LocalScheduler, array_indices
from .schedulers.pbs import PbsScheduler
from .schedulers.script import parse_script
from .schedulers.slurm import SlurmScheduler
from .transport import LocalTransport, Transport, remote_path
from .units import utc_stamp

__all__ = [
    "Job",
    "JobStore",
    "PollReport",
    "cancel_jobs",
    "open_scheduler",
    "open_transport",
    "next_delay",
    "refresh",
    "submit_script",
    "wait_for",
]

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
#: How long a job the scheduler calls ended may go without its status file before it is judged
#: by the scheduler alone: network file systems can show the file to the login node late.
STATUS_FILE_GRACE = 30.0
#: A shell's exit code above this is 128 + the signal that ended it (143: SIGTERM).
_SIGNAL_EXIT = 128


@dataclass
class Job:
    """What hpcbridge knows about one submitted job."""

    id: str
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
        data = asdict(self)
        data.pop("ended_seen")
        return data


def _safe_name(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\[\]-]", "_", job_id)


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

    def _path(self, job_id: str, *, ended: bool) -> Path:
        return (self.ended_dir if ended else self.dir) / f"{_safe_name(job_id)}.json"

    def save(self, job: Job) -> None:
        path = self._path(job.id, ended=job.final)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(asdict(job), indent=1) + "\n")
        os.replace(tmp, path)
        if job.final:
            self._path(job.id, ended=False).unlink(missing_ok=True)
        if self._live is not None:
            self._live.pop(job.id, None)  # the latest saved last, as on disk
            if not job.final:
                self._live[job.id] = job

    def get(self, job_id: str) -> Job | None:
        for ended in (False, True):
            job = self._read(self._path(job_id, ended=ended), job_id)
            if job is not None:
                return job
        return None

    def _read(self, path: Path, job_id: str) -> Job | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise SchedulerError(
                f"cannot read the record of job {job_id} ({path}): {exc}"
            ) from None
        known = {f.name for f in fields(Job)}
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
                    self._live[job.id] = job
        return list(self._live.values())

    def all(self, *, ended_since: float | None = None) -> list[Job]:
        """Every job, oldest change first; of the ended ones only those whose record changed
        after ``ended_since`` (a time.time()) when given."""
        merged = [(mtime, 1, job) for mtime, job in self._load(self.ended_dir, since=ended_since)]
        for job in self.live():
            try:
                mtime = self._path(job.id, ended=False).stat().st_mtime
            except FileNotFoundError:
                mtime = float("inf")  # saved by this store and not on disk: the newest
            merged.append((mtime, 0, job))
        return [job for _mtime, _order, job in sorted(merged, key=lambda t: (t[0], t[1]))]


# --- opening the transport and the scheduler from settings -----------------------------------


def open_transport(settings: Settings, *, accept_new_host_key: bool = False) -> Transport:
    """This machine when the profile names no host, otherwise one SSH connection to it."""
    if not settings.host:
        return LocalTransport()
    from .ssh import SshTransport

    return SshTransport(
        settings.host,
        ssh_config=Path(settings.ssh_config).expanduser() if settings.ssh_config else None,
        known_hosts=Path(settings.known_hosts).expanduser() if settings.known_hosts else None,
        accept_new_host_key=accept_new_host_key,
        connect_timeout=min(settings.timeout, 30.0),
    )


def open_scheduler(settings: Settings, transport: Transport) -> Scheduler:
    """The profile's scheduler, talking through ``transport``."""
    kind = settings.scheduler
    if kind == "local":
        if settings.host:
            raise ConfigError(
                f"profile {settings.profile!r} sets host = {settings.host!r} with the local "
                "scheduler, which runs jobs on this machine only",
                hint="set scheduler = pbs or slurm for a cluster, or remove host",
            )
        return LocalScheduler(
            settings.home / "local-jobs", max_jobs=settings.local_max_jobs, transport=transport
        )
    if kind in ("pbs", "torque"):
        return PbsScheduler(
            transport,
            flavour=settings.pbs_flavour or ("torque" if kind == "torque" else None),
            project=settings.account,
            queue=settings.queue,
            timeout=settings.timeout,
        )
    if kind == "slurm":
        return SlurmScheduler(
            transport, partition=settings.queue, account=settings.account, timeout=settings.timeout
        )
    raise ConfigError(f"unknown scheduler {kind!r}", hint="use local, pbs, torque or slurm")


# --- submit -----------------------------------------------------------------------------------


def submit_script(
    store: JobStore,
    scheduler: Scheduler,
    local_script: Path,
    *,
    after: Sequence[str] = (),
    array: str | None = None,
    work: str | None = None,
    host: str = "",
) -> Job:
    """Copy ``local_script`` to where the scheduler runs and submit it; record the job.

    A script rendered by hpcbridge goes to ``<work>/.hpcbridge/job.sh`` (its work folder is
    in the script); any other script needs ``work``, the folder to copy it into, unless jobs
    are submitted on this machine, where it is submitted in place.
    """
    transport = scheduler.transport
    try:
        text = local_script.read_text()
    except FileNotFoundError:
        raise SchedulerError(f"no such job script: {local_script}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchedulerError(f"cannot read job script {local_script}: {exc}") from None
    if not text.startswith("#!"):
        raise SchedulerError(
            f"{local_script} does not start with #! (e.g. #!/bin/bash)",
            hint="render job scripts with `hpcbridge render`",
        )
    info = parse_script(text)
    after = scheduler.check_ids(after)
    if array is not None:
        array_indices(array)  # a clear error before anything is copied or submitted
    for dep in after:
        upstream = store.get(dep)
        if upstream is not None and upstream.state in (State.FAILED, State.CANCELLED):
            raise SchedulerError(
                f"job {dep} already {upstream.state}; a job after it would never run"
            )
    if info.work_dir is not None:
        _check_work_dir_free(store, scheduler, info.work_dir, host)
        state_dir = remote_path(f"{info.work_dir}/.hpcbridge")
        transport.makedirs(state_dir)
        # An old outcome in a reused work folder would make the new job look ended at once.
        for name in transport.files_in(state_dir):
            if re.fullmatch(r"(status|started).*\.json", name):
                transport.remove(f"{state_dir}/{name}")
        target = f"{state_dir}/job.sh"
        transport.write_text(target, scheduler.prepare_script(text), mode=0o700)
    elif work is not None:
        target = remote_path(f"{work}/{local_script.name}")
        transport.write_text(target, scheduler.prepare_script(text), mode=0o700)
    elif isinstance(transport, LocalTransport):
        target = str(local_script.absolute())
        if scheduler.prepare_script(text) != text:
            target = str(local_script.absolute().with_name(f".{local_script.name}.submit"))
            transport.write_text(target, scheduler.prepare_script(text), mode=0o700)
    else:
        raise SchedulerError(
            f"{local_script} was not rendered by hpcbridge, so it has no work folder",
            hint="pass --work DIR (an absolute folder on the login node to copy it into)",
        )
    job_id = scheduler.submit(target, after=after, array=array, info=info)
    stdout, stderr = scheduler.log_paths(job_id, info)
    job = Job(
        id=job_id,
        scheduler=scheduler.kind,
        host=host,
        script=target,
        work_dir=info.work_dir,
        name=info.name or local_script.stem,
        submitted=utc_stamp(),
        after=list(after),
        array=array,
        stdout=stdout,
        stderr=stderr,
    )
    store.save(job)
    return job


def _check_work_dir_free(store: JobStore, scheduler: Scheduler, work_dir: str, host: str) -> None:
    busy = [j for j in store.live() if j.work_dir == work_dir and j.host == host]
    if busy:
        # The records may be stale: a job that ended since the last poll frees the folder.
        busy = [j for j in refresh(store, scheduler, busy).jobs if not j.final]
    for job in busy:
        raise SchedulerError(
            f"work folder {work_dir} belongs to job {job.id}, which is {job.state}",
            hint=f"wait for it (`hpcbridge jobs {job.id}`), cancel it, or render into "
            "another folder",
        )


# --- poll -------------------------------------------------------------------------------------


@dataclass
class PollReport:
    """The outcome of one poll: the jobs after it, which changed, and a failed poll's error."""

    jobs: list[Job]
    changed: list[Job]
    error: HpcBridgeError | None = None


def _read_json(transport: Transport, path: str) -> dict[str, Any] | None:
    text = transport.read_text(path, limit=64 * 1024)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None  # being written; the next poll reads it whole
    return data if isinstance(data, dict) else None


def _task_tags(job: Job) -> list[str]:
    """The suffix of each task's state files: ``.3`` for array task 3, none for a plain job."""
    return [f".{i}" for i in array_indices(job.array)] if job.array else [""]


def _started(transport: Transport, job: Job) -> bool:
    return any(
        transport.read_text(f"{job.state_dir}/started{tag}.json", limit=4096) is not None
        for tag in _task_tags(job)
    )


def _resolve(job: Job, status: JobStatus | None, transport: Transport) -> Job:
    """The job after this poll: its status file decides, the scheduler fills in."""
    if job.state_dir is None:
        return _resolve_by_scheduler(job, status)
    if status is not None and status.state in (State.QUEUED, State.HELD):
        # Not running: its folder holds no outcome of this attempt (a requeued job's is stale),
        # so no file is read for it: over SSH each read is a round trip, per job, per poll.
        return replace(
            job, state=status.state.value, raw_state=status.raw_state, reason=status.reason
        )
    outcomes = [
        _read_json(transport, f"{job.state_dir}/status{tag}.json") for tag in _task_tags(job)
    ]
    if all(outcomes):
        now = time.time()
        if (
            status is not None
            and not status.state.is_final
            and (job.ended_seen is None or now - job.ended_seen < STATUS_FILE_GRACE)
        ):
            # The script has ended but its job has not: PBS delivers the -o/-e files and says
            # why it killed a job (walltime, memory) only when the job leaves E for F, so the
            # log and the cause are read once the scheduler agrees (or the grace runs out).
            return replace(
                job,
                state=status.state.value,
                raw_state=status.raw_state,
                reason=status.reason,
                ended_seen=job.ended_seen or now,
            )
        codes = [int(o.get("exit_code", 1)) for o in outcomes if o]
        bad = [c for c in codes if c != 0]
        ends = [str(o.get("end", "")) for o in outcomes if o]
        # Ended by a signal that the scheduler says was a deletion (qdel, scancel from a shell):
        # cancelled, as if hpcbridge had cancelled it, not a failure of the recipe.
        deleted = (
            status is not None
            and status.state is State.CANCELLED
            and bool(bad)
            and all(c > _SIGNAL_EXIT for c in bad)
        )
        state = State.CANCELLED if deleted else State.FAILED if bad else State.FINISHED
        return replace(
            job,
            state=state.value,
            raw_state=status.raw_state if status else job.raw_state,
            exit_code=bad[0] if bad else 0,
            end=max(ends) if ends else utc_stamp(),
            reason=_failure_reason(bad[0], status) if bad else "",
        )
    if status is not None and not status.state.is_final:
        return replace(
            job, state=status.state.value, raw_state=status.raw_state, reason=status.reason
        )
    started = any(outcomes) or _started(transport, job)
    # The scheduler says it ended (or no longer knows it) and there is no status file yet.
    if status is not None and status.state is State.CANCELLED:
        return replace(
            job,
            state=State.CANCELLED.value,
            raw_state=status.raw_state,
            end=utc_stamp(),
            # the same words whether or not its trap had time to write a status file
            reason=_scheduler_cause(status) or status.reason or "cancelled",
        )
    if not started and status is not None and status.state is State.FAILED:
        # Failed before its script ran (e.g. the local scheduler's runner died, or PBS could
        # not start it): not a cancel.
        return replace(
            job,
            state=State.FAILED.value,
            raw_state=status.raw_state,
            exit_code=status.exit_code,
            end=utc_stamp(),
            reason=explain_kill(status) or status.reason or "failed before it started",
        )
    if not started:
        return replace(
            job,
            state=State.CANCELLED.value,
            raw_state=status.raw_state if status else "",
            end=utc_stamp(),
            reason="ended before it started (cancelled, or its dependencies failed)",
        )
    now = time.time()
    if job.ended_seen is None or now - job.ended_seen < STATUS_FILE_GRACE:
        return replace(job, ended_seen=job.ended_seen or now)
    # Killed too hard for its trap to record anything (SIGKILL): the scheduler may know why.
    return replace(
        job,
        state=State.FAILED.value,
        raw_state=status.raw_state if status else job.raw_state,
        exit_code=status.exit_code if status else None,
        end=utc_stamp(),
        reason=explain_kill(status)
        or "ended without recording an exit code (killed: walltime, memory or node failure?)",
    )


def _failure_reason(exit_code: int, status: JobStatus | None) -> str:
    """Why a job whose status file says ``exit_code`` failed.

    A job the scheduler killed records only the SIGTERM its trap caught (143), so the
    scheduler's cause wins: ``killed: walltime 00:20:00 exceeded; raise walltime ...``. Else
    ``exit code N``, with the scheduler's word on why when a signal ended the job.
    """
    cause = _scheduler_cause(status)
    if cause:
        return cause
    reason = f"exit code {exit_code}"
    if exit_code > 128 and status is not None and status.reason:
        reason += f" ({status.reason})"  # e.g. the local scheduler's "cancelled"
    return reason


def _scheduler_cause(status: JobStatus | None) -> str:
    """What killed the job, as the scheduler tells it; who deleted it first when it was
    deleted ("deleted by alice@login1: killed by signal 15 (SIGTERM)"); "" if nothing did."""
    cause = explain_kill(status)
    if cause and status is not None and status.state is State.CANCELLED and status.reason:
        return f"{status.reason}: {cause}"
    return cause


def _resolve_by_scheduler(job: Job, status: JobStatus | None) -> Job:
    """A script hpcbridge did not render writes no status file: the scheduler is all we have."""
    if status is None:
        return replace(
            job,
            state=State.UNKNOWN.value,
            raw_state="",
            reason="the scheduler no longer knows this job and its script records no outcome",
        )
    state = status.state
    if state is State.FINISHED and status.exit_code not in (None, 0):
        state = State.FAILED
    reason = status.reason
    if state.is_final:
        # The scheduler's cause of death before its comment ("Job run at ... and failed").
        cause = _scheduler_cause(status)
        if cause:
            reason = cause
        elif state is State.FAILED and status.exit_code and not reason:
            reason = f"exit code {status.exit_code}"
    return replace(
        job,
        state=state.value,
        raw_state=status.raw_state,
        exit_code=status.exit_code,
        reason=reason,
        end=utc_stamp() if state.is_final else None,
    )


def _log_tail(transport: Transport, job: Job) -> str:
    for path in (job.stderr, job.stdout):
        if not path:
            continue
        with contextlib.suppress(TransportError):
            result = transport.run(["tail", "-n", str(LOG_TAIL_LINES), "--", path], timeout=30)
            if result.ok and result.stdout.strip():
                return result.stdout.rstrip()
    return ""


def _settled(job: Job) -> bool:
    """Final, or unknown with nothing left to learn about it."""
    return job.final or (job.state == State.UNKNOWN.value and job.state_dir is None)


def refresh(store: JobStore, scheduler: Scheduler, jobs: Iterable[Job] | None = None) -> PollReport:
    """Poll the live jobs among ``jobs`` (default: all tracked) in one scheduler call.

    Records what changed, cancels jobs whose afterok parent failed, and returns the jobs.
    """
    transport = scheduler.transport
    tracked = list(store.all() if jobs is None else jobs)
    live = [j for j in tracked if not _settled(j)]
    error: HpcBridgeError | None = None
    statuses: dict[str, JobStatus] = {}
    if live:
        try:
            statuses = scheduler.status([j.id for j in live])
        except (SchedulerError, TransportError) as exc:
            # A failed poll never changes a job's state: report it and keep what we knew.
            return PollReport(tracked, [], exc)
    changed: list[Job] = []
    by_id = {j.id: j for j in tracked}
    for job in live:
        try:
            new = _resolve(job, statuses.get(job.id), transport)
        except TransportError as exc:
            error = exc
            continue
        if new.state == State.FAILED.value and not new.log_tail:
            new = replace(new, log_tail=_log_tail(transport, new))
        if new != job:
            store.save(new)
            by_id[job.id] = new
            if (new.state, new.exit_code, new.reason) != (job.state, job.exit_code, job.reason):
                changed.append(new)
    changed += _cancel_orphans(store, scheduler, by_id)
    return PollReport([by_id[j.id] for j in tracked], changed, error)


def _cancel_orphans(store: JobStore, scheduler: Scheduler, by_id: dict[str, Job]) -> list[Job]:
    """Cancel live jobs whose afterok parent failed or was cancelled, down the whole chain."""
    everyone = {j.id: j for j in store.live()}
    everyone.update(by_id)
    # Parents that ended are read one by one: only live jobs' parents matter here.
    for parent in {a for j in list(everyone.values()) if not j.final for a in j.after}:
        if parent not in everyone:
            found = store.get(parent)
            if found is not None:
                everyone[parent] = found
    cancelled: list[Job] = []
    while True:
        dead = {
            i for i, j in everyone.items() if j.state in (State.FAILED.value, State.CANCELLED.value)
        }
        orphans = [j for j in everyone.values() if not j.final and any(a in dead for a in j.after)]
        if not orphans:
            return cancelled
        try:
            scheduler.cancel([j.id for j in orphans])
        except (SchedulerError, TransportError) as exc:
            log.warning("could not cancel jobs whose dependencies failed: %s", exc)
            return cancelled
        for job in orphans:
            parent = next(a for a in job.after if a in dead)
            new = replace(
                job,
                state=State.CANCELLED.value,
                end=utc_stamp(),
                reason=f"cancelled by hpcbridge: job {parent} it depends on "
                f"{everyone[parent].state}",
            )
            store.save(new)
            everyone[job.id] = new
            if job.id in by_id:
                by_id[job.id] = new
            cancelled.append(new)


def cancel_jobs(store: JobStore, scheduler: Scheduler, ids: Sequence[str]) -> list[Job]:
    """Cancel ``ids`` (and record it); an id neither we nor the scheduler know is an error.

    Tracked jobs are polled first: one that ended since the last poll keeps its outcome (a
    scheduler quietly refuses to cancel an ended job) instead of being recorded as cancelled.
    """
    ids = scheduler.check_ids(ids)
    live = [j for j in (store.get(i) for i in ids) if j is not None and not j.final]
    if live:
        refresh(store, scheduler, live)  # a failed poll changes nothing; the cancel goes on
    to_cancel = [i for i in ids if (job := store.get(i)) is None or not job.final]
    unknown = scheduler.cancel(to_cancel) if to_cancel else []
    done: list[Job] = []
    missing: list[str] = []
    for job_id in ids:
        job = store.get(job_id)
        if job_id in unknown and job is None:
            missing.append(job_id)
            continue
        if job is None:
            job = Job(
                id=job_id,
                scheduler=scheduler.kind,
                host="",
                script="",
                work_dir=None,
                name="",
                submitted="",
            )
        if not job.final:
            job = replace(job, state=State.CANCELLED.value, end=utc_stamp(), reason="cancelled")
            store.save(job)
        done.append(job)
    if missing:
        raise SchedulerError(
            f"unknown job id(s): {', '.join(missing)}",
            hint="`hpcbridge jobs` lists the jobs this profile submitted",
        )
    return done


def wait_for(
    store: JobStore,
    scheduler: Scheduler,
    ids: Sequence[str],
    *,
    interval: float,
    max_interval: float | None = None,
    timeout: float | None = None,
    on_poll: Callable[[PollReport], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Job]:
    """Poll until every job in ``ids`` has ended; back off while nothing changes.

    The interval grows by half each quiet poll up to ``max_interval`` (default 10 x the
    interval) and drops back as soon as a job changes state.
    """
    ceiling = max_interval if max_interval is not None else interval * 10
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = interval
    while True:
        jobs = [j for j in (store.get(i) for i in ids) if j is not None]
        report = refresh(store, scheduler, jobs)
        if on_poll is not None:
            on_poll(report)
        if all(_settled(j) for j in report.jobs):
            return report.jobs
        if deadline is not None and time.monotonic() + delay > deadline:
            raise SchedulerError(
                f"jobs still running after {timeout:g} s: "
                + ", ".join(j.id for j in report.jobs if not _settled(j)),
                hint="they keep running; check later with `hpcbridge jobs`",
            )
        delay = next_delay(delay, interval, changed=bool(report.changed), ceiling=ceiling)
        sleep(delay)


def next_delay(delay: float, interval: float, *, changed: bool, ceiling: float) -> float:
    """The polite wait before the next poll: back to ``interval`` as soon as something changed,
    otherwise half as long again as the last wait, up to ``ceiling``."""
    return interval if changed else min(delay * 1.5, ceiling)
