"""``hpcbridge demo``: the whole flow on one machine, with no XNAT server and no cluster."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from ..errors import HpcBridgeError, PartialFailure
from .app import main, settings_for, settings_of
from .output import echo, emit_json
from .params import seconds_option

if TYPE_CHECKING:
    from ..runs import RunSession

DEMO_PROJECT = "PTV000"
DEMO_SCAN_TYPE = "*T1*"


@main.command("demo", short_help="Convert the sandbox's T1 scans and show where they landed.")
@seconds_option(
    "--interval",
    "Seconds between passes while waiting for the jobs.",
    default=0.5,
    show_default=True,
)
@click.pass_context
def demo_command(ctx: click.Context, interval: float) -> None:
    """Convert the sandbox's T1 scans to NIfTI and put them back, all on this machine.

    Starts the sandbox XNAT in the background (seeded project PTV000) unless it runs, then
    does what `hpcbridge --profile sandbox run dcm2niix PTV000 --scan-type '*T1*' --wait`
    does: stage in each scan's DICOM, run the real dcm2niix as a job on the local scheduler,
    and upload the NIfTI and JSON files into each scan's NIFTI resource. Then it lists them.
    Running it again finds the scans converted and only lists them.

    \b
    Example:
      hpcbridge demo
      hpcbridge --profile sandbox status
      hpcbridge sandbox stop
    """
    from ..runs import RunSession
    from ..sandbox.control import SandboxPaths, start
    from ..schedulers.local import job_search_path
    from .server import connect

    outer = settings_of(ctx)
    # Where the local scheduler's jobs will look, not only this shell's PATH.
    if shutil.which("dcm2niix", path=job_search_path()) is None:
        raise HpcBridgeError(
            "dcm2niix is not installed: the demo runs the real converter",
            hint="`pip install dcm2niix` (or your system's dcm2niix package)",
        )
    info, started = start(SandboxPaths.under(outer.home))
    say = (lambda text: None) if outer.quiet else (lambda text: echo(text, err=True))
    say(f"sandbox XNAT {'started' if started else 'running'} at {info['url']}")
    settings = settings_for(ctx, "sandbox")
    with RunSession(settings, connect=connect) as opened:
        plan, report = _converted(opened, interval, say)
        scans = [ref for ref, _why in plan.skipped] + plan.scans
        landed = _landed(opened.client, scans)
    if settings.json:
        emit_json(
            {"sandbox": info["url"], "run": plan.run.id if plan.run else None, "outputs": landed}
        )
    else:
        _tell(info["url"], landed)
    if report is not None and (report.counts.get("failed") or report.counts.get("cancelled")):
        raise PartialFailure(
            "some demo scans did not convert", hint="`hpcbridge --profile sandbox status` shows why"
        )


def _converted(opened: RunSession, interval: float, say: Callable[[str], None]) -> tuple[Any, Any]:
    """The demo's run planned and waited for (no report when every scan is converted)."""
    from ..runlock import RunLock
    from ..runs import RunRequest, start_run
    from ..runs.sync import watch

    request = RunRequest(recipe="dcm2niix", address=DEMO_PROJECT, scan_types=(DEMO_SCAN_TYPE,))
    plan = start_run(opened.settings, opened.client, opened.ledger, request)
    if plan.run is None:
        say("the T1 scans are converted already; listing them")
        return plan, None
    say(
        f"run {plan.run.id}: converting {len(plan.scans)} scan(s) of {DEMO_PROJECT} "
        "with dcm2niix on the local scheduler"
    )
    # A cron `sync` moves the demo's run too: one of the two at a time.
    lock = RunLock.for_settings(opened.settings, plan.run.id, command="demo")
    with lock.acquire(wait=None):
        report = watch(opened, plan.run, interval=interval, on_event=lambda text: say(f"  {text}"))
    return plan, report


def _landed(client: Any, scans: list[Any]) -> list[dict[str, Any]]:
    """The NIFTI resources of ``scans``, with their files."""
    from ..xnat.address import Address
    from ..xnat.browse import resources

    landed = []
    for ref in sorted(scans, key=lambda r: r.address):
        for res in resources(client, Address.parse(ref.address)):
            if res.label == "NIFTI":
                files = [f.path for f in res.files]
                landed.append({"scan": ref.address, "resource": "NIFTI", "files": files})
    return landed


def _tell(url: str, landed: list[dict[str, Any]]) -> None:
    echo()
    echo(f"NIfTI outputs in the sandbox XNAT ({url}):")
    for item in landed:
        echo(f"  {item['scan']}  resource {item['resource']}: {', '.join(item['files'])}")
    echo()
    echo(
        "Next: `hpcbridge --profile sandbox ls "
        f"{landed[0]['scan'] if landed else DEMO_PROJECT}` shows the files, "
        "`hpcbridge --profile sandbox status` the run, `hpcbridge sandbox stop` stops the "
        "sandbox."
    )
