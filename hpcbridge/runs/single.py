"""The single-job mode: per scan one compute job; this machine stages its input in before it is
submitted and uploads its outputs after it finished (over SFTP when the jobs run elsewhere)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from ..errors import StageError
from ..jobs import Job, submit_script
from ..ledger import JobRow, JobState
from ..outputs import SCAN, upload_outputs
from ..schedulers.base import State
from ..stagein import Selection, safe_name, stage_in
from ..units import utc_stamp
from ..xnat.address import Address
from .context import Pass, SyncReport, next_launch, without


class SingleJob:
    """One job per scan (see :class:`Mode`)."""

    def prepare(self, ctx: Pass, report: SyncReport) -> bool:
        return True

    def submit(self, ctx: Pass, row: JobRow) -> JobRow:
        folder = ctx.remote_folder(row)
        if row.state is JobState.PLANNED:
            _stage_in_one(ctx, row)
            row = ctx.ledger.transition(row.job_id, JobState.STAGED, work_dir=folder)
        # A job recorded as submitting but not submitted (a crash between qsub and the ledger)
        # may be in the scheduler already: adopt it rather than submit it twice.
        adopted = _adopt(ctx, row)
        if adopted is not None:
            return adopted
        script = ctx.compute_script(row, folder)
        local = ctx.local_folder(row) / ".hpcbridge-submit" / "job.sh"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(script)
        digest = hashlib.sha256(script.encode()).hexdigest()
        row = ctx.fresh_outputs(row)
        ctx.ledger.update(
            row.job_id, script_hash=digest, extra=dict(row.extra, submitting=utc_stamp())
        )
        job = submit_script(ctx.store, ctx.scheduler, local, host=ctx.settings.host or "")
        extra = dict(without(row.extra, "submitting"), launched=next_launch(row, job.submitted))
        submitted = ctx.ledger.transition(
            row.job_id, JobState.SUBMITTED, native_id=job.native_id, extra=extra
        )
        ctx.workflow(submitted)
        return submitted

    def wait_step(self, row: JobRow) -> str:
        return "stage-in" if row.state is JobState.PLANNED else "submit"

    def after_wait(self, extra: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        return extra

    def submitted(self, row: JobRow) -> str:
        return f"{row.address}: submitted as job {row.native_id}"

    def apply(self, ctx: Pass, report: SyncReport, row: JobRow, jobs: dict[str, Job]) -> None:
        job = jobs[row.native_id or ""]
        state = State(job.state)
        if state in (State.QUEUED, State.HELD, State.UNKNOWN):
            if row.raw_state != job.raw_state:
                ctx.ledger.update(row.job_id, raw_state=job.raw_state)
            return
        if state is State.RUNNING:
            running = ctx.ledger.transition(row.job_id, JobState.RUNNING, raw_state=job.raw_state)
            if row.state is not JobState.RUNNING:
                ctx.say(f"{row.address}: running (job {row.native_id})")
                ctx.workflow(running)
            return
        if state is State.FINISHED:
            ctx.ledger.transition(
                row.job_id, JobState.FINISHED, raw_state=job.raw_state, exit_code=job.exit_code
            )
            return
        final = JobState.FAILED if state is State.FAILED else JobState.CANCELLED
        updated = ctx.ledger.transition(
            row.job_id,
            final,
            detail=job.reason,
            raw_state=job.raw_state,
            exit_code=job.exit_code,
            last_error=job.reason or state.value,
            log_tail=job.log_tail,
        )
        ctx.say(f"{row.address}: {final.value}" + (f" ({job.reason})" if job.reason else ""))
        ctx.workflow(updated)
        report.failed.append(updated)

    def stage_out_needs(self, ctx: Pass) -> str:
        return "XNAT"

    def uploaded(self, ctx: Pass, row: JobRow) -> list[dict[str, Any]]:
        out, root = _outputs_of(ctx, row)
        return upload_outputs(
            ctx.client,
            Address.parse(row.address),
            out,
            ctx.recipe.outputs,
            ctx.provenance(row),
            root=root,
            home=ctx.settings.home,
        )

    def failed_step(self, missing: bool) -> str:
        return "compute" if missing else "upload"

    def finish(self, ctx: Pass) -> None:
        pass


def _adopt(ctx: Pass, row: JobRow) -> JobRow | None:
    if "submitting" not in row.extra:
        return None
    script = ctx.local_folder(row) / ".hpcbridge-submit" / "job.sh"
    job = ctx.find_submitted(row.name, ctx.remote_folder(row), row.extra["submitting"], script)
    if job is None:
        return None
    return ctx.ledger.transition(
        row.job_id,
        JobState.SUBMITTED,
        native_id=job.native_id,
        extra=without(row.extra, "submitting"),
    )


def _stage_in_one(ctx: Pass, row: JobRow) -> None:
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
        remote = f"{ctx.remote_folder(row)}/resources/{expected.name}"
        for path in sorted(expected.rglob("*")):
            if path.is_file():
                ctx.transport.put(path, f"{remote}/{path.relative_to(expected).as_posix()}")


def _outputs_of(ctx: Pass, row: JobRow) -> tuple[Path, Path]:
    """The job's output folder on this machine (copied back first when jobs run elsewhere),
    and the folder above it that the job did not write (nothing between is a link)."""
    out_remote = f"{ctx.remote_folder(row)}/out"
    if ctx.local:
        return Path(out_remote), Path(ctx.root)
    from ..ssh import SshTransport  # paramiko: loaded only where jobs run over SSH

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
