"""``hpcbridge demo``: the whole flow on one machine, with no XNAT server and no cluster."""

from __future__ import annotations

import shutil
from typing import Any

import click

from ..errors import HpcBridgeError, PartialFailure
from .app import main, settings_for, settings_of
from .output import echo, emit_json
from .params import SECONDS

DEMO_PROJECT = "PTV000"
DEMO_SCAN_TYPE = "*T1*"


@main.command("demo")
@click.option(
    "--interval",
    type=SECONDS,
    default=0.5,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between passes while waiting for the jobs.",
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
    from ..jobs import open_scheduler, open_transport
    from ..ledger import Ledger
    from ..runlock import RunLock
    from ..runner import RunRequest, start_run, wait_run
    from ..sandbox.control import SandboxPaths, start
    from ..schedulers.local import job_search_path
    from ..xnat import connect
    from ..xnat.address import Address
    from ..xnat.browse import resources

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
    request = RunRequest(recipe="dcm2niix", address=DEMO_PROJECT, scan_types=(DEMO_SCAN_TYPE,))
    with Ledger.for_settings(settings) as ledger, connect(settings) as client:
        plan = start_run(settings, client, ledger, request)
        report = None
        if plan.run is not None:
            say(
                f"run {plan.run.id}: converting {len(plan.scans)} scan(s) of {DEMO_PROJECT} "
                "with dcm2niix on the local scheduler"
            )
            transport = open_transport(settings)
            # A cron `sync` moves the demo's run too: one of the two at a time.
            lock = RunLock.for_settings(settings, plan.run.id, command="demo")
            try:
                with lock.acquire(wait=None):
                    report = wait_run(
                        settings,
                        client,
                        ledger,
                        open_scheduler(settings, transport),
                        plan.run,
                        interval=interval,
                        on_event=lambda text: say(f"  {text}"),
                    )
            finally:
                transport.close()
        else:
            say("the T1 scans are converted already; listing them")
        scans = [ref for ref, _why in plan.skipped] + plan.scans
        landed: list[dict[str, Any]] = []
        for ref in sorted(scans, key=lambda r: r.address):
            for res in resources(client, Address.parse(ref.address)):
                if res.label == "NIFTI":
                    landed.append(
                        {
                            "scan": ref.address,
                            "resource": "NIFTI",
                            "files": [f.path for f in res.files],
                        }
                    )
    if settings.json:
        emit_json(
            {"sandbox": info["url"], "run": plan.run.id if plan.run else None, "outputs": landed}
        )
    else:
        echo()
        echo(f"NIfTI outputs in the sandbox XNAT ({info['url']}):")
        for item in landed:
            echo(f"  {item['scan']}  resource {item['resource']}: {', '.join(item['files'])}")
        echo()
        echo(
            "Next: `hpcbridge --profile sandbox ls "
            f"{landed[0]['scan'] if landed else DEMO_PROJECT}` shows the files, "
            "`hpcbridge --profile sandbox status` the run, `hpcbridge sandbox stop` stops the "
            "sandbox."
        )
    if report is not None and (report.counts.get("failed") or report.counts.get("cancelled")):
        raise PartialFailure(
            "some demo scans did not convert",
            hint="`hpcbridge --profile sandbox status` shows why",
        )
