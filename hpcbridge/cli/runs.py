"""``run``: one recipe over many scans, recorded in the ledger; and what ``sync`` shares with it:
the passes over a run, their progress lines and the exit code of a run that ended."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import PartialFailure, RunBusyError
from . import hints
from .app import main, settings_of
from .handles import busy, host_key_option, say, session, take_run_lock
from .output import echo, emit_json, emit_table, status_line, warn
from .params import seconds_option
from .recipes import _set_values, recipes_option

if TYPE_CHECKING:
    from ..ledger import Run
    from ..runs import RunRequest, RunSession, SyncReport
    from ..runs.plan import Plan


def move_on(
    opened: RunSession, run: Run, lock: Any, *, watch: bool, interval: float | None, shown: bool
) -> SyncReport:
    """One pass over ``run`` under ``lock``, or (``watch``) passes until it ends, each with a
    progress line; ``shown``: a single pass's too, else only its warnings."""
    from ..runs import sync as passes

    settings = opened.settings
    progress = _Progress(settings.quiet)
    if watch:
        report = passes.watch(
            opened,
            run,
            interval=interval or settings.poll_interval,
            on_pass=_checked(lock, progress),
            on_event=say(settings.quiet),
        )
    else:
        report = passes.one_pass(opened, run, on_event=say(settings.quiet))
        (progress if shown else _warn)(report)
    if watch or shown:
        progress.close()
    return report


class _Progress:
    """Counts per state, rate and ETA on one stderr line per pass (or in place on a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, report: Any) -> None:
        _warn(report)  # also with --quiet: a cron job's mail should carry them
        if self.quiet:
            return
        counts = report.counts
        total = sum(counts.values())
        ended = sum(counts.get(s, 0) for s in ("uploaded", "failed", "cancelled"))
        elapsed = time.monotonic() - self.start
        parts = [f"{k} {v}" for k, v in counts.items() if v]
        line = f"run {report.run.id}: {ended}/{total} ended ({', '.join(parts)})"
        if 0 < ended < total and elapsed > 0:
            rate = ended / elapsed
            line += f", {rate * 60:.1f}/min, ETA {int((total - ended) / rate)} s"
        status_line(line, in_place=self.tty)

    def close(self) -> None:
        if self.tty and not self.quiet:
            echo(err=True)


def _warn(report: Any) -> None:
    for error in report.errors:
        warn(error if isinstance(error, str) else hints.line(error))


def _finish(report: Any) -> None:
    failed = report.counts.get("failed", 0) + report.counts.get("cancelled", 0)
    if report.done and failed:
        raise PartialFailure(
            f"run {report.run.id} ended with {failed} of {sum(report.counts.values())} "
            "scan(s) failed or cancelled",
            hint=f"`hpcbridge status {report.run.id}` shows why; "
            f"`hpcbridge retry {report.run.id}` tries them again",
        )


def _checked(lock: Any, on_pass: Any) -> Any:
    """``on_pass`` that first makes sure the lock is still ours: a waiting loop that lost it
    (stopped longer than the stale limit) must not go on beside the process that took it."""

    def check(report: Any) -> None:
        lock.check()
        on_pass(report)

    return check


@main.command("run", short_help="Convert every matching scan: stage in, submit, stage out.")
@click.argument("recipe")
@click.argument("address")
@click.option("--scan", "scan_ids", multiple=True, metavar="ID", help="Only this scan ID.")
@click.option(
    "--scan-type", "scan_types", multiple=True, metavar="GLOB", help="Only scans of this type."
)
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Recipe parameter.")
@click.option(
    "--max-queued",
    type=click.IntRange(min=1),
    metavar="N",
    help="At most N jobs in the scheduler at once [default: the profile's max_queued, 50].",
)
@click.option("--force", is_flag=True, help="Also redo scans already converted the same way.")
@click.option(
    "--chain",
    is_flag=True,
    help="Per scan, submit stage-in -> compute -> stage-out as dependent jobs that do the "
    "transfers on the cluster (profile keys: transfer_queue, required on PBS and Torque, "
    "transfer_walltime, bridge_command).",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and one job script; change nothing.")
@click.option("--wait", is_flag=True, help="Keep syncing until the run ends, with progress.")
@seconds_option(
    "--interval", "With --wait: seconds between passes [default: the profile's poll_interval]."
)
@recipes_option
@host_key_option
@click.pass_context
def run_command(
    ctx: click.Context,
    recipe: str,
    address: str,
    scan_ids: tuple[str, ...],
    scan_types: tuple[str, ...],
    sets: tuple[str, ...],
    max_queued: int | None,
    force: bool,
    chain: bool,
    dry_run: bool,
    wait: bool,
    interval: float | None,
    recipe_dirs: tuple[Path, ...],
    accept_new_host_key: bool,
) -> None:
    """Run a recipe over every matching scan: stage in, submit, and (with sync) stage out.

    Scans already converted by the same recipe with the same parameters are skipped. The run
    is recorded in the ledger; print its id, then follow it with `hpcbridge status` and move
    it on with `hpcbridge sync` (from cron, or with --wait here).

    \b
    Examples:
      hpcbridge run dcm2niix PTV000 --scan-type '*T1*' --dry-run
      hpcbridge run dcm2niix PTV000 --scan-type '*T1*' --max-queued 20
      hpcbridge --profile sandbox run dcm2niix PTV000/Haofei01/Haofei01_MR1 --wait
      hpcbridge --profile artemis run dcm2niix PTV000 --scan-type '*T1*' --chain
    """
    from ..runs import RunRequest

    values = _set_values(sets)
    request = RunRequest(
        recipe, address, scan_ids, scan_types, values, max_queued, force, recipe_dirs, chain
    )
    if chain:
        from ..chain import transfer_queue

        # Refused before the ledger, XNAT or the cluster is even opened: nothing changes.
        transfer_queue(settings_of(ctx))
    if dry_run:
        _dry_run(ctx, request)
        return
    with session(ctx, accept_new_host_key) as opened:
        plan = _planned(opened, request)
        if plan.run is None:
            return
        data, report = _first_passes(ctx, opened, plan.run, wait=wait, interval=interval)
    if opened.settings.json:
        emit_json(data)
    else:
        echo(plan.run.id)
    if report is not None:
        _finish(report)


def _first_passes(
    ctx: click.Context, opened: RunSession, run: Run, *, wait: bool, interval: float | None
) -> tuple[dict[str, Any], SyncReport | None]:
    """The new run's pass (``wait``: its passes until it ends) under its lock: their summary
    and report, or the busy JSON and None when another process holds the run."""
    try:
        # --wait outlasts a cron pass that got in first: wait for it rather than give up.
        command = "run --wait" if wait else "run"
        lock = take_run_lock(ctx, run.id, command, wait=None if wait else 0)
    except RunBusyError as exc:
        return busy(exc), None
    with lock:
        report = move_on(opened, run, lock, watch=wait, interval=interval, shown=False)
    return summary(report), report


def summary(report: SyncReport) -> dict[str, Any]:
    return {"run": report.run.id, "counts": report.counts, "state": report.run.state.value}


def _planned(opened: RunSession, request: RunRequest) -> Plan:
    """The run started (or resumed), with a line for each scan skipped and one for the run."""
    from ..runs import start_run

    settings = opened.settings
    plan = start_run(settings, opened.client, opened.ledger, request)
    for ref, why in plan.skipped:
        if not settings.quiet:
            echo(f"  {ref.address}: skipped, {why}", err=True)
    if plan.run is None:
        echo("nothing to do: every matching scan is converted already", err=True)
    elif not settings.quiet:
        echo(
            f"resuming run {plan.run.id} (started {plan.run.created} with the same "
            "arguments, not ended yet)"
            if plan.resumed
            else f"run {plan.run.id}: {len(plan.scans)} scan(s) planned",
            err=True,
        )
    return plan


def _dry_run(ctx: click.Context, request: Any) -> None:
    """Plan against XNAT (read-only) and print; no ledger, no files, no jobs."""
    from ..ledger import ledger_path
    from ..runs import dry_run_scripts, start_run

    settings = settings_of(ctx)
    # Read the ledger to skip converted scans, but never create it: a dry run changes nothing.
    known = ledger_path(settings).exists()
    with session(ctx, False, ledger=known, jobs=False) as opened:
        ledger = opened.ledger if known else None
        plan = start_run(settings, opened.client, ledger, request, dry_run=True)
    kind = settings.scheduler
    rows = [{"scan": r.address, "type": r.type, "action": "convert"} for r in plan.scans]
    rows += [{"scan": r.address, "type": r.type, "action": why} for r, why in plan.skipped]
    if settings.json:
        emit_json({"recipe": plan.recipe.name, "parameters": plan.values, "scans": rows})
        return
    emit_table(rows, [("scan", "SCAN"), ("type", "TYPE"), ("action", "ACTION")])
    echo(err=True)
    echo(
        f"{len(plan.scans)} scan(s) would be converted with {plan.recipe.name} on the {kind} "
        "scheduler; nothing was changed.",
        err=True,
    )
    if plan.scans:
        scripts = dry_run_scripts(settings, plan, chain_steps=request.chain)
        titles = ["stage-in job", "compute job", "stage-out job"] if request.chain else ["job"]
        for title, script in zip(titles, scripts, strict=True):
            echo(err=True)
            echo(f"# {title} script for {plan.scans[0].address}:", err=True)
            echo(script, multiline=True)
