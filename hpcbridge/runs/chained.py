"""The chain mode (``run --chain``): per scan a stage-in, a compute and a stage-out job, each
after the one before, that do the transfers on the cluster; this machine submits and polls, and
keeps the token the transfer jobs use (see hpcbridge/chain.py for their scripts and files)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from .. import chain
from ..credentials import Secret
from ..errors import EXIT_TEMPFAIL, ConfigError, HpcBridgeError, StageError, Step
from ..jobs import Job, refresh, submit_script
from ..ledger import JobRow, JobState
from ..schedulers.base import State
from ..units import utc_stamp
from .context import Pass, SyncReport, Trouble, next_launch, ref_of, without

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainState:
    """What a chained scan's ledger row keeps in its ``extra``: the scheduler ids of the steps
    submitted so far (None: none recorded), and the waiting record of the last try that found
    XNAT away, kept to count on should the next job find it away again."""

    jobs: dict[str, str] | None = None
    waited: dict[str, Any] | None = None

    @classmethod
    def of(cls, row: JobRow) -> ChainState:
        jobs, waited = row.extra.get("chain"), row.extra.get("waited")
        return cls(
            dict(jobs) if isinstance(jobs, dict) else None,
            waited if isinstance(waited, dict) else None,
        )

    def into(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` holding this state instead of the one it held."""
        out = without(extra, "chain", "waited")
        if self.jobs is not None:
            out["chain"] = self.jobs
        if self.waited is not None:
            out["waited"] = self.waited
        return out

    def before(self, step: str) -> ChainState:
        """The jobs of the steps before ``step``, which a new job of ``step`` keeps."""
        kept = chain.STEPS[: chain.STEPS.index(step)]
        jobs = self.jobs or {}
        return ChainState({s: jobs[s] for s in kept if s in jobs} if kept else None)


def native_ids(row: JobRow) -> list[str]:
    """The scheduler's ids of a row's jobs: one, or a chain's three in order."""
    jobs = ChainState.of(row).jobs
    if jobs is not None:
        return [jobs[step] for step in chain.STEPS if step in jobs]
    return [row.native_id] if row.native_id else []


class Chained:
    """Three jobs per scan (see :class:`Mode`)."""

    def prepare(self, ctx: Pass, report: SyncReport) -> bool:
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
                hint=exc.hint,
                step=Step.SYNC_AFTER,
                run_id=ctx.run.id,
            ) from None
        if mismatch:
            report.errors.append(mismatch)
        try:
            _ensure_token(ctx, report)
        except HpcBridgeError as exc:
            report.errors.append(replace(exc, message=f"no chains submitted: {exc.message}"))
            return False
        return True

    def submit(self, ctx: Pass, row: JobRow) -> JobRow:
        """Submit a scan's three jobs, each after the one before; record each id as it comes,
        so a crash part-way resumes with the steps not yet submitted."""
        folder = ctx.remote_folder(row)
        # Only a chain cut short by a crash is looked for in the scheduler: the lookup costs a
        # scheduler call per step.
        resuming = "submitting" in row.extra
        if not resuming:
            row = ctx.ledger.update(row.job_id, extra=dict(row.extra, submitting=utc_stamp()))
        since = row.extra["submitting"]
        state = ChainState.of(row)
        ids = dict(state.jobs or {})
        (ctx.local_folder(row) / ".hpcbridge-submit").mkdir(parents=True, exist_ok=True)
        after: list[str] = []
        launched = None
        for step in chain.STEPS:
            if step in ids:
                # A step that has finished (a retry keeps a chain's good steps) is no
                # dependency: the scheduler may have forgotten it, and then refuses a job
                # that waits for it.
                done = ctx.store.get(ids[step])
                if resuming and done is not None and not done.final:
                    # Ended since it was submitted, maybe long enough ago to be forgotten:
                    # ask (its status file decides) before making the next step wait for it.
                    done = refresh(ctx.store, ctx.scheduler, [done]).jobs[0]
                finished = done is not None and done.state == State.FINISHED.value
                after = [] if finished else [ids[step]]
                continue
            job = None
            if resuming:
                job = _find_step(ctx, row, step, since, after)
            if job is None:
                row, job = _submit_step(ctx, row, step, after, ids, launched or since)
            launched = launched or job.submitted
            ids[step] = job.native_id
            row = ctx.ledger.update(row.job_id, extra=ChainState(ids, state.waited).into(row.extra))
            after = [job.native_id]
        extra = dict(
            without(row.extra, "submitting"), launched=next_launch(row, launched or utc_stamp())
        )
        submitted = ctx.ledger.transition(
            row.job_id, JobState.SUBMITTED, native_id=ids["compute"], work_dir=folder, extra=extra
        )
        ctx.workflow(submitted)
        return submitted

    def wait_step(self, row: JobRow) -> str:
        return "submit"

    def after_wait(self, extra: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        # kept to count on, should the new job find XNAT away again
        return dict(extra, waited=record)

    def submitted(self, row: JobRow) -> str:
        jobs = " -> ".join(native_ids(row))
        return f"{row.address}: submitted as jobs {jobs} (stage-in -> compute -> stage-out)"

    def apply(self, ctx: Pass, report: SyncReport, row: JobRow, jobs: dict[str, Job]) -> None:
        """A chain's row from its three jobs: the first step that failed or was cancelled fails
        it (the jobs after it are cancelled by the poll), a finished stage-out ends it."""
        ids = ChainState.of(row).jobs or {}
        steps = {s: jobs[ids[s]] for s in chain.STEPS}
        for step in chain.STEPS:
            job = steps[step]
            failed = job.state == State.FAILED.value
            if failed and step != "compute" and job.exit_code == EXIT_TEMPFAIL:
                _step_away(ctx, row, step, job)
                return
            if job.state in (State.FAILED.value, State.CANCELLED.value):
                _step_failed(ctx, report, row, step, job)
                return
        if steps["stage-out"].state == State.FINISHED.value:
            ctx.ledger.transition(
                row.job_id,
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
            running = ctx.ledger.transition(row.job_id, JobState.RUNNING, raw_state=raw)
            ctx.say(f"{row.address}: running ({step} job {steps[step].native_id})")
            ctx.workflow(running)
        elif row.raw_state != raw:
            ctx.ledger.update(row.job_id, raw_state=raw)

    def stage_out_needs(self, ctx: Pass) -> str:
        return ctx.settings.host or "the scheduler"  # the report is read from the cluster

    def uploaded(self, ctx: Pass, row: JobRow) -> list[dict[str, Any]]:
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

    def failed_step(self, missing: bool) -> str:
        return "stage-out"

    def finish(self, ctx: Pass) -> None:
        """The run's chain token and the sessions its jobs opened are of no more use, on the
        cluster or in XNAT."""
        try:
            token = chain.installed_token(ctx.transport, ctx.root, ctx.client.base)
            if token is not None:
                _invalidate(ctx, token)
            for alias in chain.retired_tokens(ctx.transport, ctx.root):
                _invalidate(ctx, Secret(alias, "", "token"))
            for session in chain.cached_sessions(ctx.transport, ctx.root):
                ctx.client.end_session(session)
            chain.remove_secrets(ctx.transport, ctx.root)
        except HpcBridgeError as exc:
            log.warning("could not remove the chain's XNAT token: %s", exc.message)


def _find_step(ctx: Pass, row: JobRow, step: str, since: str, after: list[str]) -> Job | None:
    folder = ctx.remote_folder(row)
    local = ctx.local_folder(row) / ".hpcbridge-submit" / f"{step}.sh"
    work = chain.step_work(folder, step)
    return ctx.find_submitted(chain.step_name(row.name, step), work, since, local, after)


def _submit_step(
    ctx: Pass, row: JobRow, step: str, after: list[str], ids: dict[str, str], launched: str
) -> tuple[JobRow, Job]:
    """Write one step's script (a stage-out: also its spec) and submit it after ``after``."""
    folder = ctx.remote_folder(row)
    if step == "compute":
        row = ctx.fresh_outputs(row)
        script = ctx.compute_script(row, folder)
    else:
        script = chain.transfer_script(
            step,
            ctx.scheduler.template,
            settings=ctx.settings,
            bridge=chain.bridge_command(ctx.settings, local=ctx.local),
            root=ctx.root,
            folder=folder,
            name=row.name,
            ref=ref_of(row),
            input_resource=ctx.recipe.input_resource,
        )
    if step == "stage-out":
        record = ctx.provenance(row)
        record["job"].update(id=ids["compute"], exit_code=0)
        record["submitted"] = launched
        spec = chain.stage_out_spec(ctx.recipe, folder, record)
        ctx.transport.write_text(chain.spec_path(folder), json.dumps(spec, indent=1))
    local = ctx.local_folder(row) / ".hpcbridge-submit" / f"{step}.sh"
    local.write_text(script)
    host = ctx.settings.host or ""
    return row, submit_script(ctx.store, ctx.scheduler, local, after=after, host=host)


def _step_failed(ctx: Pass, report: SyncReport, row: JobRow, step: str, job: Job) -> None:
    final = JobState.FAILED if job.state == State.FAILED.value else JobState.CANCELLED
    why = f"{step} job {job.native_id} {job.state}" + (f": {job.reason}" if job.reason else "")
    updated = ctx.ledger.transition(
        row.job_id,
        final,
        detail=why,
        raw_state=f"{step} {job.raw_state}".strip(),
        exit_code=job.exit_code,
        last_error=why,
        log_tail=job.log_tail,
    )
    ctx.say(f"{row.address}: {final.value} ({why})")
    # A retry redoes this step and the ones after it, not the ones that succeeded.
    updated = ctx.ledger.update(row.job_id, extra=dict(updated.extra, failed_step=step))
    ctx.workflow(updated)
    report.failed.append(updated)


def _step_away(ctx: Pass, row: JobRow, step: str, job: Job) -> None:
    """A transfer job found XNAT away (its ``hpcbridge`` exited 75): that fails nothing. The
    scan is planned again keeping the steps that succeeded (a stage-out: stage-in and compute;
    a stage-in: none, its later jobs never ran) and waits out the run's backoff, as the bridge's
    own transfers do; then the next pass submits that step's job again."""
    found = _away_report(ctx, chain.away_path(ctx.remote_folder(row), step))
    message = str(
        found.get("error") or f"{step} job {job.native_id} found XNAT away (exit code 75)"
    )
    after = found.get("retry_after")
    away = Trouble("XNAT", True, float(after) if isinstance(after, (int, float)) else None)
    state = ChainState.of(row)
    extra = state.before(step).into(without(row.extra, "waiting"))
    # The tries of this step's earlier jobs count on: the backoff grows while XNAT stays away.
    if state.waited is not None:
        extra["waiting"] = state.waited
    again = ctx.ledger.transition(
        row.job_id,
        JobState.PLANNED,
        detail=f"{step} job {job.native_id} found XNAT away; to be submitted again",
        extra=extra,
    )
    record = ctx.wait(again, "upload" if step == "stage-out" else "stage-in", message, away)
    ctx.say(
        f"{row.address}: {step} job {job.native_id} found XNAT away; next try at {record['next']}"
    )


def _away_report(ctx: Pass, path: str) -> dict[str, Any]:
    """What a transfer job wrote when it found XNAT away; {} when it wrote nothing readable."""
    try:
        data = json.loads(ctx.transport.read_text(path) or "{}")
    except (HpcBridgeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _invalidate(ctx: Pass, token: Secret) -> None:
    mine = ctx.client.credentials
    if mine is not None and token.user == mine.user:
        return  # the login's own token, which the user still needs
    try:
        ctx.client.invalidate_token(token.user)
    except HpcBridgeError as exc:
        log.warning("could not invalidate the chain's old XNAT token: %s", exc.message)


def _ensure_token(ctx: Pass, report: SyncReport) -> None:
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
