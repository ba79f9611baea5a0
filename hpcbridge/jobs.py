"""Submitted jobs: submit a script, poll every tracked job in one call, cancel, wait.

This is the layer between the scheduler back ends and the commands ``submit``, ``jobs`` and
``cancel``. It keeps one small record per job (:mod:`.jobstore`) and decides how each job ended
from the status file its script writes (:mod:`.schedulers.outcome`). Rules it keeps:

- one scheduler status call per poll for all live jobs; a poll that fails changes nothing;
- a job whose afterok parent failed or was cancelled is cancelled here (Slurm would leave it
  pending forever);
- a failed job carries the last lines of its log.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .config import Settings
from .errors import ConfigError, HpcBridgeError, SchedulerError, Step, TransportError
from .jobstore import Job, JobStore
from .schedulers.base import JobStatus, Scheduler, State
from .schedulers.local import LocalScheduler, array_indices
from .schedulers.outcome import resolve
from .schedulers.pbs import PbsScheduler
from .schedulers.script import ScriptInfo, parse_script
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
    text = _read_script(local_script)
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
    target = _place_script(store, scheduler, local_script, text, info, work, host)
    native_id = scheduler.submit(target, after=after, array=array, info=info)
    stdout, stderr = scheduler.log_paths(native_id, info)
    job = Job(
        native_id=native_id,
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


def _read_script(local_script: Path) -> str:
    try:
        text = local_script.read_text()
    except FileNotFoundError:
        raise SchedulerError(f"no such job script: {local_script}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchedulerError(f"cannot read job script {local_script}: {exc}") from None
    if not text.startswith("#!"):
        raise SchedulerError(
            f"{local_script} does not start with #! (e.g. #!/bin/bash)", step=Step.RENDER
        )
    return text


def _place_script(
    store: JobStore,
    scheduler: Scheduler,
    local_script: Path,
    text: str,
    info: ScriptInfo,
    work: str | None,
    host: str,
) -> str:
    """Where the script is submitted from, written there as the scheduler needs it."""
    transport = scheduler.transport
    prepared = scheduler.prepare_script(text)
    if info.work_dir is not None:
        _check_work_dir_free(store, scheduler, info.work_dir, host)
        state_dir = remote_path(f"{info.work_dir}/.hpcbridge")
        transport.makedirs(state_dir)
        # An old outcome in a reused work folder would make the new job look ended at once.
        for name in transport.files_in(state_dir):
            if re.fullmatch(r"(status|started).*\.json", name):
                transport.remove(f"{state_dir}/{name}")
        target = f"{state_dir}/job.sh"
    elif work is not None:
        target = remote_path(f"{work}/{local_script.name}")
    elif isinstance(transport, LocalTransport):
        target = str(local_script.absolute())
        if prepared == text:
            return target
        target = str(local_script.absolute().with_name(f".{local_script.name}.submit"))
    else:
        raise SchedulerError(
            f"{local_script} was not rendered by hpcbridge, so it has no work folder",
            hint="pass --work DIR (an absolute folder on the login node to copy it into)",
        )
    transport.write_text(target, prepared, mode=0o700)
    return target


def _check_work_dir_free(store: JobStore, scheduler: Scheduler, work_dir: str, host: str) -> None:
    busy = [j for j in store.live() if j.work_dir == work_dir and j.host == host]
    if busy:
        # The records may be stale: a job that ended since the last poll frees the folder.
        busy = [j for j in refresh(store, scheduler, busy).jobs if not j.final]
    for job in busy:
        raise SchedulerError(
            f"work folder {work_dir} belongs to job {job.native_id}, which is {job.state}",
            step=Step.WAIT_FOR_JOB,
            native_id=job.native_id,
        )


# --- poll -------------------------------------------------------------------------------------


@dataclass
class PollReport:
    """The outcome of one poll: the jobs after it, which changed, and a failed poll's error."""

    jobs: list[Job]
    changed: list[Job]
    error: HpcBridgeError | None = None


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
            statuses = scheduler.status([j.native_id for j in live])
        except (SchedulerError, TransportError) as exc:
            # A failed poll never changes a job's state: report it and keep what we knew.
            return PollReport(tracked, [], exc)
    changed: list[Job] = []
    by_id = {j.native_id: j for j in tracked}
    for job in live:
        try:
            new = resolve(job, statuses.get(job.native_id), transport)
        except TransportError as exc:
            error = exc
            continue
        if new.state == State.FAILED.value and not new.log_tail:
            new = replace(new, log_tail=_log_tail(transport, new))
        if new != job:
            store.save(new)
            by_id[job.native_id] = new
            if (new.state, new.exit_code, new.reason) != (job.state, job.exit_code, job.reason):
                changed.append(new)
    changed += _cancel_orphans(store, scheduler, by_id)
    return PollReport([by_id[j.native_id] for j in tracked], changed, error)


def _cancel_orphans(store: JobStore, scheduler: Scheduler, by_id: dict[str, Job]) -> list[Job]:
    """Cancel live jobs whose afterok parent failed or was cancelled, down the whole chain."""
    everyone = {j.native_id: j for j in store.live()}
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
            scheduler.cancel([j.native_id for j in orphans])
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
            everyone[job.native_id] = new
            if job.native_id in by_id:
                by_id[job.native_id] = new
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
    for native_id in ids:
        job = store.get(native_id)
        if native_id in unknown and job is None:
            missing.append(native_id)
            continue
        if job is None:
            job = Job(
                native_id=native_id,
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
        raise SchedulerError(f"unknown job id(s): {', '.join(missing)}", step=Step.LIST_JOBS)
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
                + ", ".join(j.native_id for j in report.jobs if not _settled(j)),
                step=Step.CHECK_JOBS_LATER,
            )
        delay = next_delay(delay, interval, changed=bool(report.changed), ceiling=ceiling)
        sleep(delay)


def next_delay(delay: float, interval: float, *, changed: bool, ceiling: float) -> float:
    """The polite wait before the next poll: back to ``interval`` as soon as something changed,
    otherwise half as long again as the last wait, up to ``ceiling``."""
    return interval if changed else min(delay * 1.5, ceiling)
