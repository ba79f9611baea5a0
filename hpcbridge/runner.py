"""Runs: one recipe over every matching scan, recorded in the ledger, resumable at any point.

``start_run`` plans the scans and records them (state ``planned``); ``sync`` does one pass over a
run: it polls every submitted job with one scheduler call, stages out and records jobs that
finished, records failures with the end of their logs, and stages in, renders and submits planned
jobs until ``max_queued`` are in the scheduler. Every step is a ledger transition, so a run killed
at any moment resumes with the next ``sync`` without repeating what is done.

On the files: the run's folders live under ``work_root`` on the machine that runs the jobs
(``<work_root>/run-<id>/<experiment>/scans/<scan>-<type>/``, holding ``resources/<input>/files``,
``out/`` and the job's ``.hpcbridge/``). When jobs run on this machine, stage-in writes there
directly; over SSH, the data is staged into ``$HPCBRIDGE_HOME/staging`` and copied by SFTP, and
outputs are copied back before they are uploaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__, chain
from .config import Settings
from .credentials import Secret
from .errors import (
    EXIT_TEMPFAIL,
    ConfigError,
    HpcBridgeError,
    SchedulerError,
    StageError,
    TransportError,
    XnatAuthError,
    XnatConnectionError,
    XnatError,
)
from .jobs import Job, JobStore, cancel_jobs, next_delay, refresh, submit_script
from .ledger import JobRow, JobState, Ledger, Run, RunState
from .outputs import SCAN, upload_outputs
from .recipes import Recipe, find, job_name, render_script, scan_variables
from .schedulers.base import Scheduler, State
from .schedulers.script import parse_script
from .stagein import Selection, safe_name, scan_folder, stage_in
from .stageout import RefusedFileError
from .transport import LocalTransport, Transport
from .units import UTC_STAMP, parse_utc_stamp, utc_stamp
from .xnat.address import Address
from .xnat.browse import project_scans, scans_of
from .xnat.client import XnatClient
from .xnat.model import Scan, ScanRef

__all__ = [
    "RunRequest",
    "SyncReport",
    "Trouble",
    "cancel_run",
    "plan_scans",
    "retry_run",
    "start_run",
    "sync",
    "trouble_of",
]

log = logging.getLogger(__name__)

#: What a waiting scan waits to do, as ``status`` says it.
WAIT_STEPS = {
    "upload": "upload its outputs",
    "stage-in": "stage its input in",
    "submit": "submit its job",
    "poll": "hear how its job is doing",
}
#: The longest wait a Retry-After may ask for; beyond it the server is not taken at its word.
RETRY_AFTER_LIMIT = 24 * 3600.0
# How qsub and sbatch say that their server cannot be reached now (rather than refusing the job).
_SCHEDULER_AWAY = re.compile(
    r"unable to contact|cannot connect|could not connect|connection refused|timed out|"
    r"try again|temporarily|not responding|communication failure|server is busy",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for: a recipe, where, which scans, which parameter values."""

    recipe: str
    address: str
    scan_ids: tuple[str, ...] = ()
    scan_types: tuple[str, ...] = ()
    sets: dict[str, str] = field(default_factory=dict)
    max_queued: int | None = None
    force: bool = False
    recipe_dirs: tuple[Path, ...] = ()
    #: stage-in -> compute -> stage-out as dependent jobs on the cluster (see chain.py)
    chain: bool = False


@dataclass
class Plan:
    run: Run | None
    recipe: Recipe
    values: dict[str, Any]
    scans: list[ScanRef]
    skipped: list[tuple[ScanRef, str]]
    #: ``run`` is an unfinished run with the same arguments, carried on rather than repeated.
    resumed: bool = False


@dataclass
class SyncReport:
    """What one pass did, for progress lines and the exit code."""

    run: Run
    submitted: list[JobRow] = field(default_factory=list)
    uploaded: list[JobRow] = field(default_factory=list)
    failed: list[JobRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.run.state is not RunState.ACTIVE


@dataclass(frozen=True)
class Trouble:
    """A passing reason why a step could not be done now: it is tried again later, and the scan
    keeps its state. ``whole``: the service as a whole is away (not one request of one scan),
    so the pass stops asking it."""

    what: str
    whole: bool
    retry_after: float | None = None


def trouble_of(exc: HpcBridgeError, host: str | None = None) -> Trouble | None:
    """The passing trouble behind ``exc``, or None when it is a cause that retrying will not
    cure (docs/runs.md has the table)."""
    if isinstance(exc, XnatError):
        after = exc.retry_after
        # An expired session is renewed by the client itself; a login refused after that is
        # the bridge's to fix (`hpcbridge login`), never a reason to fail a scan's work.
        if isinstance(exc, (XnatConnectionError, XnatAuthError)):
            return Trouble("XNAT", True, after)
        if exc.status in (408, 429, 502, 503, 504):
            return Trouble("XNAT", True, after)
        if exc.status is not None and exc.status >= 500:
            return Trouble("XNAT", False, after)
        return None
    if isinstance(exc, TransportError):  # SSH down, a command that could not run or timed out
        return Trouble(host or "the scheduler", True)
    if isinstance(exc, SchedulerError) and _SCHEDULER_AWAY.search(exc.message):
        return Trouble("the scheduler", True)
    return None


def backoff(settings: Settings, tries: int, retry_after: float | None = None) -> float:
    """Seconds to wait after ``tries`` failed tries: ``retry_interval`` doubling up to
    ``retry_max``, or longer when the server asked for longer."""
    delay = min(settings.retry_max, settings.retry_interval * 2 ** max(0, tries - 1))
    if retry_after:
        delay = max(delay, min(retry_after, RETRY_AFTER_LIMIT))
    return delay


def _stamp(epoch: float) -> str:
    # Rounded up: a try is never made before the time status showed for it.
    return datetime.fromtimestamp(math.ceil(epoch), tz=timezone.utc).strftime(UTC_STAMP)


def waiting(row: JobRow) -> dict[str, Any] | None:
    """What the scan is waiting for (see :func:`_wait`), or None."""
    record = row.extra.get("waiting")
    return record if isinstance(record, dict) else None


def _due(row: JobRow, now: float) -> bool:
    record = waiting(row)
    if record is None:
        return True
    try:
        return parse_utc_stamp(str(record.get("next"))).timestamp() <= now
    except ValueError:
        return True


def _without(extra: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in keys}


# --- planning --------------------------------------------------------------------------------


def plan_scans(
    client: XnatClient, address: Address, *, ids: Sequence[str] = (), types: Sequence[str] = ()
) -> list[ScanRef]:
    """Every scan below ``address`` that matches the IDs or type globs (all when neither)."""
    project = address.project or ""
    if address.depth >= 3:
        experiment_id, label, scans = scans_of(
            client, Address(address.project, address.subject, address.experiment)
        )
        refs = [
            ScanRef(
                project,
                address.subject or "",
                experiment_id,
                label,
                s.id,
                s.type,
                s.series_description,
                s.quality,
            )  # fmt: skip
            for s in scans
        ]
        if address.scan:
            refs = [r for r in refs if r.scan_id == address.scan]
    else:
        refs = project_scans(client, project)
        if address.subject:
            refs = [r for r in refs if r.subject_label == address.subject]
    wanted_ids, globs = tuple(ids), tuple(types)
    if wanted_ids or globs:
        refs = [
            r
            for r in refs
            if r.scan_id in wanted_ids or any(fnmatch.fnmatchcase(r.type, g) for g in globs)
        ]
    return sorted(refs, key=lambda r: (r.subject_label, r.experiment_label, _scan_order(r)))


def _scan_order(ref: ScanRef) -> tuple[int, str]:
    return (int(ref.scan_id), "") if ref.scan_id.isdigit() else (1 << 30, ref.scan_id)


def _recipe(settings: Settings, name: str, dirs: Sequence[Path]) -> Recipe:
    return find(name, list(dirs), settings.home)


def start_run(
    settings: Settings,
    client: XnatClient,
    ledger: Ledger | None,
    request: RunRequest,
    *,
    dry_run: bool = False,
) -> Plan:
    """Plan the scans and (unless ``dry_run``) record the run and one planned job per scan."""
    _work_root(settings)  # a profile that cannot place the data fails before anything is recorded
    if request.chain:
        chain.transfer_queue(settings)  # so does a PBS chain whose transfers could not reach XNAT
    recipe = _recipe(settings, request.recipe, request.recipe_dirs)
    values = recipe.values(dict(request.sets))
    address = Address.parse(request.address)
    types = request.scan_types or (() if request.scan_ids else recipe.scan_types)
    if types == ("*",) and not request.scan_ids:
        types = ()
    scans = plan_scans(client, address, ids=request.scan_ids, types=types)
    if not scans:
        raise StageError(
            f"no scan below {address} matches "
            + (", ".join([*request.scan_ids, *types]) or "the recipe's scan types"),
            hint=f"`hpcbridge ls {address}` shows what is there",
        )
    todo: list[ScanRef] = []
    skipped: list[tuple[ScanRef, str]] = []
    for ref in scans:
        done = None
        if ledger is not None and not request.force:
            done = ledger.find_done(recipe.name, values, ref.address)
        if done is not None:
            skipped.append((ref, f"already converted by run {done.run_id} (use --force to redo)"))
        else:
            todo.append(ref)
    if dry_run or ledger is None:
        return Plan(None, recipe, values, todo, skipped)
    options = {
        "scan_ids": list(request.scan_ids),
        "scan_types": list(types),
        "max_queued": request.max_queued or settings.max_queued,
        "recipe_dirs": [str(p) for p in request.recipe_dirs],
        "recipe_version": recipe.version,
        "chain": request.chain,
    }
    # The same `run` repeated (after a crash, a lost terminal) carries on with the run it
    # started: planning its unfinished scans in a new run would submit and upload them twice.
    run = None
    if not request.force:
        run = _unfinished_twin(ledger, settings.profile, recipe.name, values, str(address), options)
    resumed = run is not None
    if run is None:
        if not todo:
            return Plan(None, recipe, values, todo, skipped)
        run = ledger.create_run(
            recipe=recipe.name,
            params=values,
            target=str(address),
            profile=settings.profile,
            options=options,
        )
    tag = run_tag(ledger, run)
    for ref in todo:
        ledger.add_job(
            run.id,
            address=ref.address,
            project=ref.project,
            subject=ref.subject_label,
            experiment=ref.experiment_label,
            experiment_id=ref.experiment_id,
            scan=ref.scan_id,
            scan_type=ref.type,
            # Unique, and recognisable in qstat: run, experiment, scan. The scheduler is asked
            # for it by name after a crash, so it must not match another ledger's run 1.
            name=f"hb{run.id}-{tag}_{safe_name(ref.experiment_label)}_{safe_name(ref.scan_id)}",
        )
    return Plan(run, recipe, values, todo, skipped, resumed=resumed)


def run_tag(ledger: Ledger, run: Run) -> str:
    """Four hex digits telling this run from the runs of the same number in other ledgers
    (another user's, another HPCBRIDGE_HOME) in a shared scheduler's job names."""
    seed = f"{ledger.path.absolute()}|{run.id}|{run.created}"
    return hashlib.sha256(seed.encode()).hexdigest()[:4]


def _unfinished_twin(
    ledger: Ledger,
    profile: str,
    recipe: str,
    values: dict[str, Any],
    target: str,
    options: dict[str, Any],
) -> Run | None:
    """The latest active run of this profile made with the same recipe, values and scans."""
    same = ("scan_ids", "scan_types", "recipe_version")
    for run in reversed(ledger.runs(profile)):
        if (
            run.state is RunState.ACTIVE
            and (run.recipe, run.target, run.params) == (recipe, target, values)
            and all(run.options.get(k) == options[k] for k in same)
            and bool(run.options.get("chain")) == options["chain"]
        ):
            return run
    return None


def dry_run_scripts(settings: Settings, plan: Plan, *, chain_steps: bool = False) -> list[str]:
    """The job script the first planned scan would get (a chain's three), for ``--dry-run``."""
    ref = plan.scans[0]
    root = _work_root(settings) + "/run-N"
    folder = root + "/" + _scan_relative(ref.experiment_label, ref)
    # No cluster is asked in a dry run: the flavour is the profile's, PBS Pro when unset.
    pbs_torque = settings.scheduler == "pbs" and settings.pbs_flavour == "torque"
    template = "torque" if pbs_torque else settings.scheduler
    name = f"hbN_{safe_name(ref.experiment_label)}_{safe_name(ref.scan_id)}"
    compute = _job_script(settings, plan.recipe, template, plan.values, folder, name, ref)
    if not chain_steps:
        return [compute]
    transfers = {
        step: chain.transfer_script(
            step,
            template,
            settings=settings,
            bridge=chain.bridge_command(settings, local=not settings.host),
            root=root,
            folder=folder,
            name=name,
            ref=ref,
            input_resource=plan.recipe.input_resource,
        )
        for step in ("stage-in", "stage-out")
    }
    return [transfers["stage-in"], compute, transfers["stage-out"]]


def _job_script(
    settings: Settings,
    recipe: Recipe,
    template: str,
    values: dict[str, Any],
    folder: str,
    name: str,
    ref: ScanRef,
) -> str:
    """The job script for one scan's folder; the recipe's queue and account win over the
    profile's."""
    return render_script(
        recipe,
        template,
        values=values,
        input_dir=f"{folder}/resources/{safe_name(recipe.input_resource)}/files",
        output_dir=f"{folder}/out",
        work_dir=folder,
        name=name,
        scan=scan_variables(ref),
        queue=recipe.resources.queue or settings.queue,
        account=recipe.resources.account or settings.account,
    )


# --- one pass ------------------------------------------------------------------------------


def _work_root(settings: Settings) -> str:
    """Where runs keep their folders, on the side of the transport that runs the jobs."""
    if settings.work_root:
        root = settings.work_root
    elif settings.host:
        raise ConfigError(
            f"profile {settings.profile!r} submits to {settings.host} but sets no work_root: "
            "the absolute folder on the cluster where runs keep their data",
            hint='add e.g. work_root = "/scratch/PROJECT/hpcbridge" to the profile',
        )
    else:
        root = str(settings.home.absolute() / "work")
    if not root.startswith("/"):
        raise ConfigError(f"work_root must be an absolute path, not {root!r}")
    return root.rstrip("/")


def _scan_relative(experiment: str, ref: ScanRef) -> str:
    """The same folder stage-in makes for the scan: ``<experiment>/scans/<scan>-<type>``."""
    return f"{safe_name(experiment)}/scans/{scan_folder(Scan(ref.scan_id, ref.type))}"


class _Context:
    """Everything one pass needs, opened once: one XNAT session, one transport, one ledger."""

    def __init__(
        self,
        settings: Settings,
        client: XnatClient,
        ledger: Ledger,
        scheduler: Scheduler,
        run: Run,
        *,
        on_event: Callable[[str], None] | None = None,
        store: JobStore | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.scheduler = scheduler
        self.transport: Transport = scheduler.transport
        self.local = isinstance(self.transport, LocalTransport)
        # One store for every pass of a process: it reads the profile's job records once, not
        # once per pass (polls check every record for afterok orphans).
        self.store = store or JobStore(settings.home, settings.profile)
        self.run = run
        self.recipe = _recipe(
            settings, run.recipe, [Path(p) for p in run.options.get("recipe_dirs", [])]
        )
        self.root = f"{_work_root(settings)}/run-{run.id}"
        self.staging = settings.home / "staging" / f"run-{run.id}"
        self.say = on_event or (lambda _text: None)
        self.chain = bool(run.options.get("chain"))
        #: What is away for this pass (XNAT, the scheduler, the SSH host), with the waiting
        #: record of the try that found it away: the pass asks it nothing more, so a run
        #: backs off as a whole instead of knocking once per scan.
        self.down: dict[str, dict[str, Any]] = {}
        #: Scans that wait for something away, by what, for one warning per pass.
        self.waits: dict[str, list[str]] = {}

    def note_backoff(self, rows: Sequence[JobRow], now: float) -> None:
        """Carry on a backoff of the run that an earlier pass began."""
        for row in rows:
            record = waiting(row)
            if record and record.get("whole") and record.get("for") and not _due(row, now):
                self.down.setdefault(str(record["for"]), record)

    def remote_folder(self, job: JobRow) -> str:
        ref = _ref(job)
        return f"{self.root}/{_scan_relative(job.experiment or '', ref)}"

    def local_folder(self, job: JobRow) -> Path:
        """Where this machine keeps the scan's files (the same folder when jobs run here)."""
        if self.local:
            return Path(self.remote_folder(job))
        return self.staging / _scan_relative(job.experiment or "", _ref(job))


def _ref(job: JobRow) -> ScanRef:
    return ScanRef(
        job.project or "",
        job.subject or "",
        job.experiment_id or "",
        job.experiment or "",
        job.scan or "",
        job.scan_type or "",
    )


def sync(
    settings: Settings,
    client: XnatClient,
    ledger: Ledger,
    scheduler: Scheduler,
    run: Run,
    *,
    on_event: Callable[[str], None] | None = None,
    store: JobStore | None = None,
) -> SyncReport:
    """One pass over ``run``: poll, stage out, submit more. Safe to repeat at any time."""
    ctx = _Context(settings, client, ledger, scheduler, run, on_event=on_event, store=store)
    report = SyncReport(run)
    if run.state is RunState.ACTIVE:
        ctx.note_backoff(ledger.jobs(run.id), time.time())
        _poll(ctx, report)
        _stage_out_finished(ctx, report)
        _submit_planned(ctx, report)
        for what, scans in ctx.waits.items():
            record = ctx.down.get(what)
            when = f", next try at {record['next']}" if record else ""
            error = f": {record['error']}" if record else ""
            report.errors.append(
                f"{len(scans)} scan(s) wait for {what}{when}{error}"
                if len(scans) > 1
                else f"{scans[0]}: waits for {what}{when}{error}"
            )
    report.counts = ledger.counts(run.id)
    live = sum(report.counts.get(s.value, 0) for s in JobState if not s.final)
    if run.state is RunState.ACTIVE and live == 0:
        ledger.set_run_state(run.id, RunState.DONE)
        if ctx.chain:
            _chain_token_removed(ctx)
    report.run = ledger.run(run.id)
    return report


def _native_ids(row: JobRow) -> list[str]:
    """The scheduler's ids of a row's jobs: one, or a chain's three in order."""
    ids = row.extra.get("chain")
    if isinstance(ids, dict):
        return [ids[step] for step in chain.STEPS if step in ids]
    return [row.native_id] if row.native_id else []


def _poll(ctx: _Context, report: SyncReport) -> None:
    in_scheduler = ctx.ledger.jobs(ctx.run.id, [JobState.SUBMITTED, JobState.RUNNING])
    records: list[Job] = []
    polled_rows: list[JobRow] = []
    for row in in_scheduler:
        jobs = [ctx.store.get(i) for i in _native_ids(row)]
        if not jobs or None in jobs:
            missing = [i for i, j in zip(_native_ids(row), jobs, strict=True) if j is None]
            message = (
                f"job {', '.join(missing) or row.native_id} of {row.address} "
                "is not in the job records"
            )
            ctx.ledger.transition(row.id, JobState.FAILED, last_error=message)
            report.errors.append(message)
            continue
        records += [j for j in jobs if j is not None]
        polled_rows.append(row)
    if not records:
        return
    now = time.time()
    if not any(_due(row, now) for row in polled_rows):
        return  # backing off: the scheduler could not be asked a moment ago
    polled = refresh(ctx.store, ctx.scheduler, records)
    if polled.error is not None:
        report.errors.append(f"could not poll the scheduler: {polled.error.message}")
        away = trouble_of(polled.error, ctx.settings.host) or Trouble("the scheduler", True)
        for row in polled_rows:
            _wait(ctx, row, "poll", polled.error.message, away)
        return
    for i, row in enumerate(polled_rows):
        if waiting(row) is not None:
            polled_rows[i] = ctx.ledger.update(row.id, extra=_without(row.extra, "waiting"))
    by_native = {j.id: j for j in polled.jobs}
    for row in polled_rows:
        if ctx.chain:
            ids = row.extra["chain"]
            _apply_chain(ctx, report, row, {s: by_native[ids[s]] for s in chain.STEPS})
        else:
            _apply(ctx, report, row, by_native[row.native_id or ""])


def _apply(ctx: _Context, report: SyncReport, row: JobRow, job: Job) -> None:
    state = State(job.state)
    if state in (State.QUEUED, State.HELD, State.UNKNOWN):
        if row.raw_state != job.raw_state:
            ctx.ledger.update(row.id, raw_state=job.raw_state)
        return
    if state is State.RUNNING:
        running = ctx.ledger.transition(row.id, JobState.RUNNING, raw_state=job.raw_state)
        if row.state is not JobState.RUNNING:
            ctx.say(f"{row.address}: running (job {row.native_id})")
            _workflow(ctx, running)
        return
    if state is State.FINISHED:
        ctx.ledger.transition(
            row.id, JobState.FINISHED, raw_state=job.raw_state, exit_code=job.exit_code
        )
        return
    final = JobState.FAILED if state is State.FAILED else JobState.CANCELLED
    updated = ctx.ledger.transition(
        row.id,
        final,
        detail=job.reason,
        raw_state=job.raw_state,
        exit_code=job.exit_code,
        last_error=job.reason or state.value,
        log_tail=job.log_tail,
    )
    ctx.say(f"{row.address}: {final.value}" + (f" ({job.reason})" if job.reason else ""))
    _workflow(ctx, updated)
    report.failed.append(updated)


def _apply_chain(ctx: _Context, report: SyncReport, row: JobRow, steps: dict[str, Job]) -> None:
    """A chain's row from its three jobs: the first step that failed or was cancelled fails it
    (the jobs after it are cancelled by the poll), a finished stage-out ends it."""
    for step in chain.STEPS:
        job = steps[step]
        if job.state == State.FAILED.value and step != "compute" and job.exit_code == EXIT_TEMPFAIL:
            _chain_step_away(ctx, row, step, job)
            return
        if job.state in (State.FAILED.value, State.CANCELLED.value):
            final = JobState.FAILED if job.state == State.FAILED.value else JobState.CANCELLED
            why = f"{step} job {job.id} {job.state}" + (f": {job.reason}" if job.reason else "")
            updated = ctx.ledger.transition(
                row.id,
                final,
                detail=why,
                raw_state=f"{step} {job.raw_state}".strip(),
                exit_code=job.exit_code,
                last_error=why,
                log_tail=job.log_tail,
            )
            ctx.say(f"{row.address}: {final.value} ({why})")
            # A retry redoes this step and the ones after it, not the ones that succeeded.
            updated = ctx.ledger.update(row.id, extra=dict(updated.extra, failed_step=step))
            _workflow(ctx, updated)
            report.failed.append(updated)
            return
    if steps["stage-out"].state == State.FINISHED.value:
        ctx.ledger.transition(
            row.id,
            JobState.FINISHED,
            raw_state=f"stage-out {steps['stage-out'].raw_state}".strip(),
            exit_code=steps["compute"].exit_code,
        )
        return
    # The step the chain is at: the first that has not finished.
    step = next(s for s in chain.STEPS if steps[s].state != State.FINISHED.value)
    raw = f"{step} {steps[step].raw_state}".strip()
    moving = step != "stage-in" or steps[step].state == State.RUNNING.value
    if moving and row.state is not JobState.RUNNING:
        running = ctx.ledger.transition(row.id, JobState.RUNNING, raw_state=raw)
        ctx.say(f"{row.address}: running ({step} job {steps[step].id})")
        _workflow(ctx, running)
    elif row.raw_state != raw:
        ctx.ledger.update(row.id, raw_state=raw)


def _chain_step_away(ctx: _Context, row: JobRow, step: str, job: Job) -> None:
    """A transfer job found XNAT away (its ``hpcbridge`` exited 75): that fails nothing. The scan
    is planned again keeping the steps that succeeded (a stage-out: stage-in and compute; a
    stage-in: none, its later jobs never ran) and waits out the run's backoff, as the bridge's
    own transfers do; then the next pass submits that step's job again."""
    found = _away_report(ctx, chain.away_path(ctx.remote_folder(row), step))
    message = str(found.get("error") or f"{step} job {job.id} found XNAT away (exit code 75)")
    after = found.get("retry_after")
    away = Trouble("XNAT", True, float(after) if isinstance(after, (int, float)) else None)
    ids = row.extra.get("chain") or {}
    kept = chain.STEPS[: chain.STEPS.index(step)]
    extra = _without(row.extra, "chain", "waited", "waiting")
    if kept:
        extra["chain"] = {s: ids[s] for s in kept if s in ids}
    # The tries of this step's earlier jobs count on: the backoff grows while XNAT stays away.
    if isinstance(row.extra.get("waited"), dict):
        extra["waiting"] = row.extra["waited"]
    again = ctx.ledger.transition(
        row.id,
        JobState.PLANNED,
        detail=f"{step} job {job.id} found XNAT away; to be submitted again",
        extra=extra,
    )
    record = _wait(ctx, again, "upload" if step == "stage-out" else "stage-in", message, away)
    ctx.say(f"{row.address}: {step} job {job.id} found XNAT away; next try at {record['next']}")


def _away_report(ctx: _Context, path: str) -> dict[str, Any]:
    """What a transfer job wrote when it found XNAT away; {} when it wrote nothing readable."""
    try:
        data = json.loads(ctx.transport.read_text(path) or "{}")
    except (HpcBridgeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


#: XNAT workflow statuses (the experiment's History table) for the ledger's states.
WORKFLOW_STATUS = {
    JobState.SUBMITTED: "Queued",
    JobState.RUNNING: "Running",
    JobState.UPLOADED: "Complete",
    JobState.FAILED: "Failed",
    JobState.CANCELLED: "Failed (Dismissed)",
}


def _workflow(ctx: _Context, row: JobRow) -> None:
    """Show the job in XNAT's history of its experiment (best effort: XNAT is not the record).

    XNAT finds an entry by experiment, pipeline name and launch time, so each attempt keeps
    its launch time (the submission time) and later calls update the same entry.
    """
    status = WORKFLOW_STATUS.get(row.state)
    launched = row.extra.get("launched") or row.submitted_at
    if status is None or not row.experiment_id or not launched or "XNAT" in ctx.down:
        return
    prefix = "wrk:workflowData/"
    params = {
        prefix + "id": row.experiment_id,
        # one entry per scan: two scans of a session may be launched in the same second
        prefix + "pipeline_name": f"hpcbridge/{ctx.recipe.name} scan {row.scan}",
        prefix + "launch_time": launched.replace("T", " ").rstrip("Z"),
        prefix + "data_type": "xnat:imageSessionData",
        prefix + "status": status,
        prefix + "ExternalID": row.project or "",
        prefix + "jobID": row.native_id or "",
        prefix + "details": f"scan {row.scan}, hpcbridge run {row.run_id}"
        + (f": {row.last_error}" if row.last_error and status.startswith("Failed") else ""),
    }
    try:
        ctx.client.request("PUT", "/data/workflows", "the XNAT workflow entry", params=params)
    except HpcBridgeError as exc:
        log.warning("%s: could not record the workflow in XNAT: %s", row.address, exc.message)
        away = trouble_of(exc)
        if away is not None and away.whole:
            ctx.down.setdefault("XNAT", _away_record(ctx, away, exc.message))


def _stage_out_finished(ctx: _Context, report: SyncReport) -> None:
    now = time.time()
    for row in ctx.ledger.jobs(ctx.run.id, [JobState.FINISHED]):
        if not _due(row, now):
            continue  # backing off: nothing is asked of XNAT before the time status shows
        # A chain's report is read from the cluster; everything else is XNAT's.
        needs = (ctx.settings.host or "the scheduler") if ctx.chain else "XNAT"
        if needs in ctx.down:
            found = f"the run's try found {needs} away: {ctx.down[needs]['error']}"
            _wait(ctx, row, "upload", found, Trouble(needs, True))
            continue
        try:
            uploaded = _chain_uploaded(ctx, row) if ctx.chain else _stage_out_one(ctx, row)
        except HpcBridgeError as exc:
            _stage_out_failed(ctx, report, row, exc)
            continue
        done = ctx.ledger.transition(
            row.id,
            JobState.UPLOADED,
            uploaded=uploaded,
            extra=_without(row.extra, "waiting", "waited", "stage_out_tries"),
        )
        ctx.say(f"{row.address}: uploaded {len(uploaded)} file(s)")
        _workflow(ctx, done)
        report.uploaded.append(_drop_old_outputs(ctx, done))


def _stage_out_failed(ctx: _Context, report: SyncReport, row: JobRow, exc: HpcBridgeError) -> None:
    """Wait when the cause passes (XNAT or the cluster away); fail the scan only for a cause
    that retrying will not cure: an output that must not be read (a link, a FIFO) at once, and
    any other error of the upload itself (no outputs, a digest that does not match) when it
    repeats. Uploads are idempotent, so trying again is safe."""
    away = trouble_of(exc, ctx.settings.host)
    if away is not None:
        _wait(ctx, row, "upload", exc.message, away)
        return
    first = waiting(row)
    if (
        isinstance(exc, StageError)
        and not isinstance(exc, RefusedFileError)
        and not (first and first.get("check"))
    ):
        record = _wait(ctx, row, "upload", exc.message, None)
        report.errors.append(
            f"{row.address}: stage-out failed, will retry once at {record['next']}: {exc.message}"
        )
        return
    # A retry uploads a job's outputs again without computing them again (a chain: submits a
    # stage-out job on its own); but outputs that are not there must be computed again.
    missing = exc.message.startswith("the job wrote no output matching") or exc.message.endswith(
        ": no such folder"
    )
    failed = ctx.ledger.transition(
        row.id,
        JobState.FAILED,
        last_error=f"stage-out failed: {exc.message}",
        extra=dict(
            _without(row.extra, "waiting", "waited", "stage_out_tries"),
            failed_step="stage-out" if ctx.chain else ("compute" if missing else "upload"),
        ),
    )
    report.failed.append(failed)
    ctx.say(f"{row.address}: failed: stage-out: {exc.message}")
    _workflow(ctx, failed)


def _away_record(ctx: _Context, away: Trouble, message: str, tries: int = 1) -> dict[str, Any]:
    return {
        "for": away.what,
        "whole": away.whole,
        "next": _stamp(time.time() + backoff(ctx.settings, tries, away.retry_after)),
        "error": message,
    }


def _wait(
    ctx: _Context,
    row: JobRow,
    step: str,
    message: str,
    away: Trouble | None,
) -> dict[str, Any]:
    """Record on the scan what it waits for, to do which step, since when, after how many
    tries, and when the next try is; its state stays as it is. ``away`` None: the step failed
    for a reason of its own, which fails the scan if it happens once more.

    A pass that finds XNAT (or the cluster) away counts a try for every scan it could not
    move for that reason, and gives them all the next try of the run's backoff."""
    row = ctx.ledger.job(row.id)  # fresh: a half-done submission may have recorded job ids
    old = waiting(row)
    same = old is not None and old.get("step") == step
    tries = (int(old.get("tries") or 0) if same and old else 0) + 1
    shared = ctx.down.get(away.what) if away is not None and away.whole else None
    after = away.retry_after if away is not None else None
    if shared is not None and "step" in shared:  # a scan's try set the run's next, not a side call
        next_at, after = str(shared["next"]), shared.get("retry_after")
    else:
        next_at = _stamp(time.time() + backoff(ctx.settings, tries, after))
    record: dict[str, Any] = {
        "for": away.what if away is not None else None,
        "step": step,
        "since": old["since"] if same and old else utc_stamp(),
        "tries": tries,
        "next": next_at,
        "error": message,
        "whole": bool(away and away.whole),
        "check": away is None,
        "retry_after": after,
    }
    if away is not None:
        if away.whole and "step" not in ctx.down.get(away.what, {}):
            ctx.down[away.what] = record
        ctx.waits.setdefault(away.what, []).append(row.address)
    if old != record:
        ctx.ledger.update(row.id, extra=dict(row.extra, waiting=record))
    return record


def describe_wait(record: dict[str, Any]) -> str:
    """``status``'s words for a waiting record."""
    step = WAIT_STEPS.get(str(record.get("step")), str(record.get("step")))
    if record.get("check"):
        return f"waiting to {step} once more at {record.get('next')} (the first try failed)"
    tries = int(record.get("tries") or 0)
    count = "not tried yet" if not tries else f"{tries} {'try' if tries == 1 else 'tries'}"
    return (
        f"waiting for {record.get('for')} to {step} since {record.get('since')} "
        f"({count}, next try at {record.get('next')})"
    )


def _outputs_of(ctx: _Context, row: JobRow) -> tuple[Path, Path]:
    """The job's output folder on this machine (copied back first when jobs run elsewhere),
    and the folder above it that the job did not write (nothing between is a link)."""
    out_remote = f"{ctx.remote_folder(row)}/out"
    if ctx.local:
        return Path(out_remote), Path(ctx.root)
    from .ssh import SshTransport  # paramiko: loaded only where jobs run over SSH

    if not isinstance(ctx.transport, SshTransport):
        raise StageError(f"cannot copy outputs back over a {ctx.transport.name} transport")
    out_local = ctx.local_folder(row) / "out"
    # Exactly what the job wrote this time: files copied back for an earlier attempt must not
    # go up with it.
    if out_local.exists():
        shutil.rmtree(out_local)
    out_local.mkdir(parents=True, exist_ok=True)
    ctx.transport.get_files(out_remote, out_local, below=ctx.root, scope=SCAN)
    return out_local, ctx.staging


# Moves the output folder $1 aside to $2 (or $2.1, $2.2, ... if taken) and prints where to.
_MOVE_ASIDE = (
    '[ -e "$1" ] || exit 0; d="$2"; i=1; '
    'while [ -e "$d" ]; do d="$2.$i"; i=$((i + 1)); done; mv -T -- "$1" "$d" && printf %s "$d"'
)


def _fresh_outputs(ctx: _Context, row: JobRow) -> JobRow:
    """A computation starts from an empty output folder: tools such as dcm2niix do not
    overwrite, they write ``..._4a.nii.gz`` beside an earlier result, and both would be
    uploaded. The old folder is moved aside (``out.attempt-N``), not deleted: it is the only
    result there is until the new one is verified in XNAT."""
    if not row.attempts:
        return row  # a first attempt's folder is new; asking costs a command per scan over SSH
    folder = ctx.remote_folder(row)
    result = ctx.transport.run(
        ["sh", "-c", _MOVE_ASIDE, "sh", f"{folder}/out", f"{folder}/out.attempt-{row.attempts - 1}"]
    )
    if not result.ok:
        raise StageError(f"{row.address}: cannot move the old output folder aside: {result.said()}")
    moved = result.stdout.strip()
    if not moved:
        return row
    log.info(
        "%s: the old output folder is kept as %s until this attempt is uploaded", row.address, moved
    )
    kept = [*row.extra.get("old_out", []), moved]
    return ctx.ledger.update(row.id, extra=dict(row.extra, old_out=kept))


def _drop_old_outputs(ctx: _Context, row: JobRow) -> JobRow:
    """The new result is in XNAT and verified: earlier attempts' output folders can go."""
    folder = ctx.remote_folder(row)
    old = [p for p in row.extra.get("old_out", []) if p.startswith(f"{folder}/out.attempt-")]
    if not old:
        return row
    try:
        result = ctx.transport.run(["rm", "-rf", "--", *old])
    except HpcBridgeError as exc:  # the upload is done; leftovers must not fail the pass
        log.warning("%s: could not remove %s: %s", row.address, ", ".join(old), exc.message)
        return row
    if not result.ok:
        log.warning("%s: could not remove %s: %s", row.address, ", ".join(old), result.said())
        return row
    return ctx.ledger.update(row.id, extra=_without(row.extra, "old_out"))


def _chain_uploaded(ctx: _Context, row: JobRow) -> list[dict[str, Any]]:
    """What a chain's stage-out job uploaded, from the report it wrote before ending."""
    path = chain.report_path(ctx.remote_folder(row))
    text = ctx.transport.read_text(path)
    try:
        uploaded = json.loads(text)["uploaded"] if text else None
    except (ValueError, KeyError, TypeError):
        uploaded = None
    if not isinstance(uploaded, list):
        raise StageError(f"the stage-out job ended without a readable report at {path}")
    return uploaded


def _stage_out_one(ctx: _Context, row: JobRow) -> list[dict[str, Any]]:
    out, root = _outputs_of(ctx, row)
    return upload_outputs(
        ctx.client,
        Address.parse(row.address),
        out,
        ctx.recipe.outputs,
        _provenance(ctx, row),
        root=root,
        home=ctx.settings.home,
    )


def _provenance(ctx: _Context, row: JobRow) -> dict[str, Any]:
    """What made a scan's outputs; the upload adds the converter version and the files."""
    return {
        "tool": f"hpcbridge {__version__}",
        "recipe": ctx.recipe.name,
        "recipe_version": ctx.recipe.version,
        "parameters": ctx.run.params,
        "source": {"scan": row.address, "resource": ctx.recipe.input_resource},
        "run": ctx.run.id,
        "job": {"id": row.native_id, "scheduler": ctx.scheduler.kind, "exit_code": row.exit_code},
        "submitted": row.submitted_at,
        "ended": row.ended_at,
    }


def _submit_planned(ctx: _Context, report: SyncReport) -> None:
    cap = int(ctx.run.options.get("max_queued") or ctx.settings.max_queued)
    queued = len(ctx.ledger.jobs(ctx.run.id, [JobState.SUBMITTED, JobState.RUNNING]))
    todo = ctx.ledger.jobs(ctx.run.id, [JobState.PLANNED, JobState.STAGED])
    if ctx.chain and todo and queued < cap and not ctx.down:
        # A bridge_command that cannot run, or a PBS profile without a transfer queue (a run
        # started before one was required, or a profile changed since), is the profile's to fix:
        # stop here (ConfigError), before queueing chains whose every stage-in would fail.
        where = ctx.settings.host or "this machine"
        bridge = chain.bridge_command(ctx.settings, local=ctx.local)
        try:
            chain.transfer_queue(ctx.settings)
            mismatch = chain.check_bridge(ctx.transport, bridge, where)
        except ConfigError as exc:
            raise ConfigError(
                f"run {ctx.run.id}: {exc.message}",
                hint=f"{exc.hint}; then `hpcbridge sync {ctx.run.id}` goes on",
            ) from None
        if mismatch:
            report.errors.append(mismatch)
        try:
            _chain_token(ctx, report)
        except HpcBridgeError as exc:
            report.errors.append(f"no chains submitted: {exc}")  # with its hint: what to do
            return
    now = time.time()
    for row in todo:
        if queued >= cap or ctx.down:
            return  # something the submissions need is away: this pass leaves them be
        if not _due(row, now):
            continue
        try:
            submitted = _submit_chain(ctx, row) if ctx.chain else _submit_one(ctx, row)
        except HpcBridgeError as exc:
            away = trouble_of(exc, ctx.settings.host)
            if away is not None:
                planned = row.state is JobState.PLANNED and not ctx.chain
                step = "stage-in" if planned else "submit"
                _wait(ctx, row, step, exc.message, away)
                continue
            # Stage-in errors name the scan already; the ledger row and the line name it once.
            reason = exc.message.removeprefix(f"{row.address}: ")
            failed = ctx.ledger.transition(row.id, JobState.FAILED, last_error=reason)
            report.failed.append(failed)
            ctx.say(f"{row.address}: failed: {reason}")
            continue
        queued += 1
        record = waiting(submitted)
        if record is not None:
            extra = _without(submitted.extra, "waiting")
            if ctx.chain:  # kept to count on, should the new job find XNAT away again
                extra["waited"] = record
            submitted = ctx.ledger.update(submitted.id, extra=extra)
        report.submitted.append(submitted)
        if ctx.chain:
            jobs = " -> ".join(_native_ids(submitted))
            ctx.say(f"{row.address}: submitted as jobs {jobs} (stage-in -> compute -> stage-out)")
        else:
            ctx.say(f"{row.address}: submitted as job {submitted.native_id}")


def _submit_one(ctx: _Context, row: JobRow) -> JobRow:
    folder = ctx.remote_folder(row)
    if row.state is JobState.PLANNED:
        _stage_in_one(ctx, row)
        row = ctx.ledger.transition(row.id, JobState.STAGED, work_dir=folder)
    # A job recorded as submitting but not submitted (a crash between qsub and the ledger) may
    # be in the scheduler already: adopt it rather than submit it twice.
    adopted = _adopt(ctx, row)
    if adopted is not None:
        return adopted
    script = _job_script(
        ctx.settings,
        ctx.recipe,
        ctx.scheduler.template,
        ctx.run.params,
        folder,
        row.name,
        _ref(row),
    )
    local = ctx.local_folder(row) / ".hpcbridge-submit" / "job.sh"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(script)
    digest = hashlib.sha256(script.encode()).hexdigest()
    row = _fresh_outputs(ctx, row)
    ctx.ledger.update(row.id, script_hash=digest, extra=dict(row.extra, submitting=utc_stamp()))
    job = submit_script(ctx.store, ctx.scheduler, local, host=ctx.settings.host or "")
    submitted = ctx.ledger.transition(
        row.id,
        JobState.SUBMITTED,
        native_id=job.id,
        extra=dict(
            {k: v for k, v in row.extra.items() if k != "submitting"}, launched=job.submitted
        ),
    )
    _workflow(ctx, submitted)
    return submitted


def _adopt(ctx: _Context, row: JobRow) -> JobRow | None:
    if "submitting" not in row.extra:
        return None
    script = ctx.local_folder(row) / ".hpcbridge-submit" / "job.sh"
    job = _find_submitted(ctx, row.name, ctx.remote_folder(row), row.extra["submitting"], script)
    if job is None:
        return None
    return ctx.ledger.transition(
        row.id,
        JobState.SUBMITTED,
        native_id=job.id,
        extra={k: v for k, v in row.extra.items() if k != "submitting"},
    )


def _find_submitted(
    ctx: _Context, name: str, work_dir: str, since: str, script: Path, after: Sequence[str] = ()
) -> Job | None:
    """The job submitted for ``work_dir`` since ``since`` that a crash kept out of the ledger.

    First in hpcbridge's job records; when the crash came between qsub answering and that
    record being written, in the scheduler itself, by the job's unique name (the local
    scheduler's jobs by their work folder). A job found there that our records hold already is
    an earlier attempt's, not this one.
    """
    host = ctx.settings.host or ""
    wanted = job_name(name)
    known: set[str] = set()
    for job in ctx.store.all():
        known.add(job.id)
        # By name, or by work folder (unique per run, scan and step): the local scheduler's
        # records carry the script's file name, not the ledger's.
        mine = job.name == wanted or (job.work_dir == work_dir and job.host == host)
        if mine and job.submitted >= since:
            log.info("%s: found job %s submitted before a crash; adopting it", work_dir, job.id)
            return job
    found = [i for i in ctx.scheduler.find_jobs(name=wanted, work_dir=work_dir) if i not in known]
    if not found:
        return None
    job_id = found[-1]
    log.info(
        "%s: the scheduler has job %s, submitted before a crash; adopting it", work_dir, job_id
    )
    info = parse_script(script.read_text() if script.is_file() else "")
    stdout, stderr = ctx.scheduler.log_paths(job_id, info)
    job = Job(
        id=job_id,
        scheduler=ctx.scheduler.kind,
        host=host,
        script=f"{work_dir}/.hpcbridge/job.sh",
        work_dir=work_dir,
        name=wanted,
        submitted=utc_stamp(),
        after=list(after),
        stdout=stdout,
        stderr=stderr,
    )
    ctx.store.save(job)
    return job


def _submit_chain(ctx: _Context, row: JobRow) -> JobRow:
    """Submit a scan's three jobs, each after the one before; record each id as it comes, so a
    crash part-way resumes with the steps not yet submitted."""
    folder = ctx.remote_folder(row)
    # Only a chain cut short by a crash is looked for in the scheduler: the lookup costs a
    # scheduler call per step.
    resuming = "submitting" in row.extra
    if not resuming:
        row = ctx.ledger.update(row.id, extra=dict(row.extra, submitting=utc_stamp()))
    ids: dict[str, str] = dict(row.extra.get("chain") or {})
    template = ctx.scheduler.template
    scripts = ctx.local_folder(row) / ".hpcbridge-submit"
    scripts.mkdir(parents=True, exist_ok=True)
    after: list[str] = []
    launched = None
    for step in chain.STEPS:
        if step in ids:
            # A step that has finished (a retry keeps a chain's good steps) is no dependency:
            # the scheduler may have forgotten it, and then refuses a job that waits for it.
            done = ctx.store.get(ids[step])
            after = [] if done is not None and done.state == State.FINISHED.value else [ids[step]]
            continue
        work = chain.step_work(folder, step)
        local = scripts / f"{step}.sh"
        job = None
        if resuming:
            since = row.extra["submitting"]
            job = _find_submitted(ctx, chain.step_name(row.name, step), work, since, local, after)
        if job is None:
            if step == "compute":
                row = _fresh_outputs(ctx, row)
                script = _job_script(
                    ctx.settings, ctx.recipe, template, ctx.run.params, folder, row.name, _ref(row)
                )
            else:
                script = chain.transfer_script(
                    step,
                    template,
                    settings=ctx.settings,
                    bridge=chain.bridge_command(ctx.settings, local=ctx.local),
                    root=ctx.root,
                    folder=folder,
                    name=row.name,
                    ref=_ref(row),
                    input_resource=ctx.recipe.input_resource,
                )
            if step == "stage-out":
                provenance = _provenance(ctx, row)
                provenance["job"].update(id=ids["compute"], exit_code=0)
                provenance["submitted"] = launched or row.extra["submitting"]
                spec = chain.stage_out_spec(ctx.recipe, folder, provenance)
                ctx.transport.write_text(chain.spec_path(folder), json.dumps(spec, indent=1))
            local.write_text(script)
            job = submit_script(
                ctx.store, ctx.scheduler, local, after=after, host=ctx.settings.host or ""
            )
        launched = launched or job.submitted
        ids[step] = job.id
        row = ctx.ledger.update(row.id, extra=dict(row.extra, chain=ids))
        after = [job.id]
    submitted = ctx.ledger.transition(
        row.id,
        JobState.SUBMITTED,
        native_id=ids["compute"],
        work_dir=folder,
        extra=dict(
            {k: v for k, v in row.extra.items() if k != "submitting"},
            launched=launched or utc_stamp(),
        ),
    )
    _workflow(ctx, submitted)
    return submitted


def _chain_token_removed(ctx: _Context) -> None:
    """The run has ended: its chain token and the sessions its jobs opened are of no more use,
    on the cluster or in XNAT."""
    try:
        token = chain.installed_token(ctx.transport, ctx.root, ctx.client.base)
        if token is not None:
            _invalidate_chain_token(ctx, token)
        for alias in chain.retired_tokens(ctx.transport, ctx.root):
            _invalidate_chain_token(ctx, Secret(alias, "", "token"))
        for session in chain.cached_sessions(ctx.transport, ctx.root):
            ctx.client.end_session(session)
        chain.remove_secrets(ctx.transport, ctx.root)
    except HpcBridgeError as exc:
        log.warning("could not remove the chain's XNAT token: %s", exc.message)


def _invalidate_chain_token(ctx: _Context, token: Secret) -> None:
    mine = ctx.client.credentials
    if mine is not None and token.user == mine.user:
        return  # the login's own token, which the user still needs
    try:
        ctx.client.invalidate_token(token.user)
    except HpcBridgeError as exc:
        log.warning("could not invalidate the chain's old XNAT token: %s", exc.message)


def _chain_token(ctx: _Context, report: SyncReport) -> None:
    """Make sure the run's chain folder holds a token that lasts; warn when it may not.

    A token is replaced only when it would expire before a chain submitted now could end (its
    walltimes); the one it replaces is invalidated when the run ends (or expires before), as
    jobs of the chains submitted before may still need it (chain.retire_token).
    """
    url = ctx.client.base
    seconds = chain.chain_seconds(ctx.settings, ctx.recipe)
    token = chain.installed_token(ctx.transport, ctx.root, url)
    if token is None or token.expired(time.time() + seconds):
        old, token = token, chain.fresh_token(ctx.client)
        chain.install_token(ctx.transport, ctx.root, url, token, ctx.settings)
        if old is not None and old.user != token.user:
            chain.retire_token(ctx.transport, ctx.root, old)
    warning = chain.expiry_warning(token, seconds)
    if warning:
        report.errors.append(warning)


def _stage_in_one(ctx: _Context, row: JobRow) -> None:
    address = Address(row.project or "", row.subject or "", row.experiment or "")
    dest = Path(ctx.root) if ctx.local else ctx.staging
    result = stage_in(
        ctx.client,
        address,
        dest,
        selection=Selection(ids=(row.scan or "",)),
        resource=ctx.recipe.input_resource,
    )
    if result.failed:
        _scan, error = result.failed[0]
        raise error
    staged = result.staged[0]
    expected = ctx.local_folder(row) / "resources" / safe_name(ctx.recipe.input_resource)
    if staged.folder != expected:
        # stage-in names folders after XNAT's own scan folder; keep one layout for the job
        expected.parent.mkdir(parents=True, exist_ok=True)
        if expected.exists():
            shutil.rmtree(expected)
        staged.folder.rename(expected)
    if not ctx.local:
        _copy_up(ctx, expected, f"{ctx.remote_folder(row)}/resources/{expected.name}")


def _copy_up(ctx: _Context, local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            ctx.transport.put(path, f"{remote}/{path.relative_to(local).as_posix()}")


# --- retry and cancel ----------------------------------------------------------------------


def retry_run(
    ledger: Ledger, run: Run, *, include_cancelled: bool = False, rerun: bool = False
) -> list[JobRow]:
    """Redo what failed of failed (and optionally cancelled) jobs; the next sync does it.

    A job that ended well but whose outputs could not be uploaded goes back to ``finished``:
    its outputs are uploaded again, not computed again. A chain whose stage-out job failed
    keeps its stage-in and compute jobs and gets a new stage-out job. Anything else is
    planned again and computed from an empty output folder, as is every job with ``rerun``.
    """
    states = [JobState.FAILED] + ([JobState.CANCELLED] if include_cancelled else [])
    again = []
    for row in ledger.jobs(run.id, states):
        step = row.extra.get("failed_step") if row.state is JobState.FAILED and not rerun else None
        extra = _without(row.extra, "stage_out_tries", "waiting", "waited", "failed_step", "chain")
        if step == "upload" and row.exit_code == 0:
            again.append(
                ledger.transition(
                    row.id, JobState.FINISHED, detail="retry: upload again", extra=extra
                )
            )
            continue
        ids = row.extra.get("chain")
        if step == "stage-out" and isinstance(ids, dict) and "compute" in ids:
            extra["chain"] = {k: ids[k] for k in chain.STEPS[:2] if k in ids}
        # Otherwise a chain is submitted whole again: its stage-in skips what is staged already.
        again.append(ledger.transition(row.id, JobState.PLANNED, extra=extra))
    if again and run.state is not RunState.ACTIVE:
        ledger.set_run_state(run.id, RunState.ACTIVE)
    return again


def cancel_run(ledger: Ledger, scheduler: Scheduler, run: Run, store: JobStore) -> list[JobRow]:
    """Cancel every job of the run that has not ended; the run is then cancelled."""
    live = [row for row in ledger.jobs(run.id) if not row.final and row.state != JobState.FINISHED]
    in_scheduler = [i for r in live for i in _native_ids(r)]
    if in_scheduler:
        cancel_jobs(store, scheduler, in_scheduler)
    done = [ledger.transition(r.id, JobState.CANCELLED, detail="run cancelled") for r in live]
    ledger.set_run_state(run.id, RunState.CANCELLED)
    return done


def wait_run(
    settings: Settings,
    client: XnatClient,
    ledger: Ledger,
    scheduler: Scheduler,
    run: Run,
    *,
    interval: float,
    on_pass: Callable[[SyncReport], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    store: JobStore | None = None,
) -> SyncReport:
    """Sync until the run ends, backing off while nothing changes."""
    delay = interval
    store = store or JobStore(settings.home, settings.profile)
    while True:
        report = sync(settings, client, ledger, scheduler, run, on_event=on_event, store=store)
        if on_pass is not None:
            on_pass(report)
        if report.done:
            return report
        run = report.run
        busy = bool(report.submitted or report.uploaded or report.failed)
        delay = next_delay(delay, interval, changed=busy, ceiling=interval * 10)
        sleep(delay)
