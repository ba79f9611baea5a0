"""What one pass over a run works with (``Pass``), what it reports (``SyncReport``), the ``Mode``
that says how the run's scans are computed (one job each, or a chain of three), and the steps
both modes take: a compute job's script, adopting a job that a crash kept out of the ledger, a
fresh output folder per attempt, the provenance of the outputs. And the trouble that passes
(XNAT or the cluster away): how long to back off, and the ``waiting`` record a scan keeps in its
ledger row meanwhile."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from ..config import Settings
from ..errors import (
    HpcBridgeError,
    SchedulerError,
    StageError,
    TransportError,
    XnatAuthError,
    XnatConnectionError,
    XnatError,
)
from ..jobs import Job
from ..ledger import JobRow, JobState, Run, RunState
from ..recipes import job_name
from ..schedulers.script import parse_script
from ..transport import LocalTransport, Transport
from ..units import UTC_STAMP, parse_utc_stamp, utc_stamp
from ..xnat.model import ScanRef
from .plan import job_script, recipe_of, scan_relative, work_root
from .session import RunSession

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


def stamp(epoch: float) -> str:
    # Rounded up: a try is never made before the time status showed for it.
    return datetime.fromtimestamp(math.ceil(epoch), tz=timezone.utc).strftime(UTC_STAMP)


def waiting(row: JobRow) -> dict[str, Any] | None:
    """What the scan is waiting for (see :meth:`Pass.wait`), or None."""
    record = row.extra.get("waiting")
    return record if isinstance(record, dict) else None


def due(row: JobRow, now: float) -> bool:
    record = waiting(row)
    if record is None:
        return True
    try:
        return parse_utc_stamp(str(record.get("next"))).timestamp() <= now
    except ValueError:
        return True


def without(extra: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in keys}


def next_launch(row: JobRow, submitted: str) -> str:
    """An attempt's launch time: its submission, or a second after the attempt before it when
    that one launched in the same second. XNAT finds a History entry by launch time to the
    second, so a quick retry would otherwise overwrite its failed attempt's entry."""
    before = row.extra.get("launched")
    if isinstance(before, str) and before >= submitted:
        return stamp(parse_utc_stamp(before).timestamp() + 1)
    return submitted


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


#: XNAT workflow statuses (the experiment's History table) for the ledger's states.
WORKFLOW_STATUS = {
    JobState.SUBMITTED: "Queued",
    JobState.RUNNING: "Running",
    JobState.UPLOADED: "Complete",
    JobState.FAILED: "Failed",
    JobState.CANCELLED: "Failed (Dismissed)",
}


# Moves the output folder $1 aside to $2 (or $2.1, $2.2, ... if taken) and prints where to.
_MOVE_ASIDE = (
    '[ -e "$1" ] || exit 0; d="$2"; i=1; '
    'while [ -e "$d" ]; do d="$2.$i"; i=$((i + 1)); done; mv -T -- "$1" "$d" && printf %s "$d"'
)


@dataclass
class SyncReport:
    """What one pass did, for progress lines and the exit code."""

    run: Run
    submitted: list[JobRow] = field(default_factory=list)
    uploaded: list[JobRow] = field(default_factory=list)
    failed: list[JobRow] = field(default_factory=list)
    errors: list[str | HpcBridgeError] = field(default_factory=list)  # the CLI words those
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.run.state is not RunState.ACTIVE


class Mode(Protocol):
    """How a run computes a scan: the steps of a pass that differ between a single job (the
    bridge stages in and out itself) and a chain (transfer jobs do it on the cluster)."""

    def prepare(self, ctx: Pass, report: SyncReport) -> bool:
        """Before the pass submits: False when it must submit nothing."""

    def submit(self, ctx: Pass, row: JobRow) -> JobRow:
        """Submit the scan's job(s); the row as submitted."""

    def wait_step(self, row: JobRow) -> str:
        """The step a submission that found something away waits to do."""

    def after_wait(self, extra: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """A submitted row's ``extra`` once the wait ``record`` is over."""

    def submitted(self, row: JobRow) -> str:
        """The line that says the scan is submitted."""

    def apply(self, ctx: Pass, report: SyncReport, row: JobRow, jobs: dict[str, Job]) -> None:
        """Move the row on by what the poll says of its jobs (``jobs`` by native id)."""

    def stage_out_needs(self, ctx: Pass) -> str:
        """What a finished scan's outputs are read from."""

    def uploaded(self, ctx: Pass, row: JobRow) -> list[dict[str, Any]]:
        """The finished scan's outputs, uploaded."""

    def failed_step(self, missing: bool) -> str:
        """The step a retry redoes after a stage-out that failed (``missing``: no outputs)."""

    def finish(self, ctx: Pass) -> None:
        """The run has ended."""


class Pass:
    """Everything one pass needs, opened once: one XNAT session, one transport, one ledger."""

    def __init__(
        self,
        session: RunSession,
        run: Run,
        mode: Mode,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        settings = self.settings = session.settings
        self.client = session.client
        self.ledger = session.ledger
        self.scheduler = session.scheduler
        self.store = session.store
        self.transport: Transport = self.scheduler.transport
        self.local = isinstance(self.transport, LocalTransport)
        self.run = run
        self.mode = mode
        dirs = [Path(p) for p in run.options.get("recipe_dirs", [])]
        self.recipe = recipe_of(settings, run.recipe, dirs)
        self.root = f"{work_root(settings)}/run-{run.id}"
        self.staging = settings.home / "staging" / f"run-{run.id}"
        self.say = on_event or (lambda _text: None)
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
            if record and record.get("whole") and record.get("for") and not due(row, now):
                self.down.setdefault(str(record["for"]), record)

    def remote_folder(self, job: JobRow) -> str:
        return f"{self.root}/{scan_relative(job.experiment or '', ref_of(job))}"

    def local_folder(self, job: JobRow) -> Path:
        """Where this machine keeps the scan's files (the same folder when jobs run here)."""
        if self.local:
            return Path(self.remote_folder(job))
        return self.staging / scan_relative(job.experiment or "", ref_of(job))

    def wait(self, row: JobRow, step: str, message: str, away: Trouble | None) -> dict[str, Any]:
        """Record on the scan what it waits for, to do which step, since when, after how many
        tries, and when the next try is; its state stays as it is. ``away`` None: the step
        failed for a reason of its own, which fails the scan if it happens once more.

        A pass that finds XNAT (or the cluster) away counts a try for every scan it could not
        move for that reason, and gives them all the next try of the run's backoff."""
        row = self.ledger.job(row.job_id)  # fresh: a half-done submission may have recorded job ids
        old = waiting(row)
        same = old is not None and old.get("step") == step
        tries = (int(old.get("tries") or 0) if same and old else 0) + 1
        shared = self.down.get(away.what) if away is not None and away.whole else None
        after = away.retry_after if away is not None else None
        if shared is not None and "step" in shared:  # a scan's try set the run's next
            next_at, after = str(shared["next"]), shared.get("retry_after")
        else:
            next_at = stamp(time.time() + backoff(self.settings, tries, after))
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
            if away.whole and "step" not in self.down.get(away.what, {}):
                self.down[away.what] = record
            self.waits.setdefault(away.what, []).append(row.address)
        if old != record:
            self.ledger.update(row.job_id, extra=dict(row.extra, waiting=record))
        return record

    def workflow(self, row: JobRow) -> None:
        """Show the job in XNAT's history of its experiment (best effort: XNAT is not the
        record). XNAT finds an entry by experiment, pipeline name and launch time, so each
        attempt keeps its launch time (the submission time) and later calls update it."""
        status = WORKFLOW_STATUS.get(row.state)
        launched = row.extra.get("launched") or row.submitted_at
        if status is None or not row.experiment_id or not launched or "XNAT" in self.down:
            return
        prefix = "wrk:workflowData/"
        params = {
            prefix + "id": row.experiment_id,
            # one entry per scan: two scans of a session may be launched in the same second
            prefix + "pipeline_name": f"hpcbridge/{self.recipe.name} scan {row.scan}",
            prefix + "launch_time": launched.replace("T", " ").rstrip("Z"),
            prefix + "data_type": "xnat:imageSessionData",
            prefix + "status": status,
            prefix + "ExternalID": row.project or "",
            prefix + "jobID": row.native_id or "",
            prefix + "details": f"scan {row.scan}, hpcbridge run {row.run_id}"
            + (f": {row.last_error}" if row.last_error and status.startswith("Failed") else ""),
        }
        try:
            self.client.request("PUT", "/data/workflows", "the XNAT workflow entry", params=params)
        except HpcBridgeError as exc:
            log.warning("%s: could not record the workflow in XNAT: %s", row.address, exc.message)
            away = trouble_of(exc)
            if away is not None and away.whole:
                next_at = stamp(time.time() + backoff(self.settings, 1, away.retry_after))
                record = {"for": away.what, "whole": True, "next": next_at, "error": exc.message}
                self.down.setdefault("XNAT", record)

    def compute_script(self, row: JobRow, folder: str) -> str:
        template = self.scheduler.template
        return job_script(
            self.settings, self.recipe, template, self.run.params, folder, row.name, ref_of(row)
        )

    def find_submitted(
        self, name: str, work_dir: str, since: str, script: Path, after: Sequence[str] = ()
    ) -> Job | None:
        """The job submitted for ``work_dir`` since ``since`` that a crash kept out of the ledger.

        First in hpcbridge's job records; when the crash came between qsub answering and that
        record being written, in the scheduler itself, by the job's unique name (the local
        scheduler's jobs by their work folder). A job found there that our records hold already is
        an earlier attempt's, not this one.
        """
        host = self.settings.host or ""
        wanted = job_name(name)
        known: set[str] = set()
        for job in self.store.all():
            known.add(job.native_id)
            # By name, or by work folder (unique per run, scan and step): the local scheduler's
            # records carry the script's file name, not the ledger's.
            mine = job.name == wanted or (job.work_dir == work_dir and job.host == host)
            if mine and job.submitted >= since:
                log.info(
                    "%s: found job %s submitted before a crash; adopting it",
                    work_dir,
                    job.native_id,
                )
                return job
        found = [
            i for i in self.scheduler.find_jobs(name=wanted, work_dir=work_dir) if i not in known
        ]
        if not found:
            return None
        native_id = found[-1]
        log.info(
            "%s: the scheduler has job %s, submitted before a crash; adopting it",
            work_dir,
            native_id,
        )
        info = parse_script(script.read_text() if script.is_file() else "")
        stdout, stderr = self.scheduler.log_paths(native_id, info)
        job = Job(
            native_id=native_id,
            scheduler=self.scheduler.kind,
            host=host,
            script=f"{work_dir}/.hpcbridge/job.sh",
            work_dir=work_dir,
            name=wanted,
            submitted=utc_stamp(),
            after=list(after),
            stdout=stdout,
            stderr=stderr,
        )
        self.store.save(job)
        return job

    def fresh_outputs(self, row: JobRow) -> JobRow:
        """A computation starts from an empty output folder: tools such as dcm2niix do not
        overwrite, they write ``..._4a.nii.gz`` beside an earlier result, and both would be
        uploaded. The old folder is moved aside (``out.attempt-N``), not deleted: it is the only
        result there is until the new one is verified in XNAT."""
        if not row.attempts:
            return row  # a first attempt's folder is new; asking costs a command per scan over SSH
        folder = self.remote_folder(row)
        result = self.transport.run(
            [
                "sh",
                "-c",
                _MOVE_ASIDE,
                "sh",
                f"{folder}/out",
                f"{folder}/out.attempt-{row.attempts - 1}",
            ]
        )
        if not result.ok:
            raise StageError(
                f"{row.address}: cannot move the old output folder aside: {result.said()}"
            )
        moved = result.stdout.strip()
        if not moved:
            return row
        log.info(
            "%s: the old output folder is kept as %s until this attempt is uploaded",
            row.address,
            moved,
        )
        kept = [*row.extra.get("old_out", []), moved]
        return self.ledger.update(row.job_id, extra=dict(row.extra, old_out=kept))

    def drop_old_outputs(self, row: JobRow) -> JobRow:
        """The new result is in XNAT and verified: earlier attempts' output folders can go."""
        folder = self.remote_folder(row)
        old = [p for p in row.extra.get("old_out", []) if p.startswith(f"{folder}/out.attempt-")]
        if not old:
            return row
        try:
            result = self.transport.run(["rm", "-rf", "--", *old])
        except HpcBridgeError as exc:  # the upload is done; leftovers must not fail the pass
            log.warning("%s: could not remove %s: %s", row.address, ", ".join(old), exc.message)
            return row
        if not result.ok:
            log.warning("%s: could not remove %s: %s", row.address, ", ".join(old), result.said())
            return row
        return self.ledger.update(row.job_id, extra=without(row.extra, "old_out"))

    def provenance(self, row: JobRow) -> dict[str, Any]:
        """What made a scan's outputs; the upload adds the converter version and the files."""
        job = {"id": row.native_id, "scheduler": self.scheduler.kind, "exit_code": row.exit_code}
        return {
            "tool": f"hpcbridge {__version__}",
            "recipe": self.recipe.name,
            "recipe_version": self.recipe.version,
            "parameters": self.run.params,
            "source": {"scan": row.address, "resource": self.recipe.input_resource},
            "run": self.run.id,
            "job": job,
            "submitted": row.submitted_at,
            "ended": row.ended_at,
        }


def ref_of(job: JobRow) -> ScanRef:
    return ScanRef(
        job.project or "",
        job.subject or "",
        job.experiment_id or "",
        job.experiment or "",
        job.scan or "",
        job.scan_type or "",
    )
