#!/usr/bin/env python3
"""Convert one XNAT scan to NIfTI with hpcbridge's Python API: stage in, render, submit, wait,
stage out. Settings come from the profile and the environment, as for the CLI (HPCBRIDGE_PROFILE,
HPCBRIDGE_XNAT, the token `hpcbridge login` stored, ...). Run it where the jobs can read its
files: on the cluster's login node, or on any machine with the local scheduler.

    python examples/python-api.py PROJECT/SUBJECT/EXPERIMENT/SCAN
"""

import shutil
import sys
from pathlib import Path

from hpcbridge import jobs, recipes
from hpcbridge.config import load_settings
from hpcbridge.errors import HpcBridgeError
from hpcbridge.outputs import upload_outputs
from hpcbridge.stagein import stage_in
from hpcbridge.xnat import Address, connect


def convert(scan: Address) -> None:
    if scan.depth != 4:
        raise HpcBridgeError(f"{scan} is not a scan (PROJECT/SUBJECT/EXPERIMENT/SCAN)")
    settings = load_settings()
    work = Path(settings.work_root or settings.home / "work", "api", str(scan).replace("/", "_"))
    recipe = recipes.find("dcm2niix", home=settings.home)
    with connect(settings) as xnat:
        report = stage_in(xnat, scan, work / "in")
    if report.failed:
        raise report.failed[0][1]
    shutil.rmtree(work / "out", ignore_errors=True)  # dcm2niix renames rather than overwrites
    script = work / "job.sh"
    with jobs.open_transport(settings) as transport:
        scheduler = jobs.open_scheduler(settings, transport)
        script.write_text(
            recipes.render_script(
                recipe,
                scheduler.template,
                values=recipe.values(),
                input_dir=str(report.staged[0].files_dir),
                output_dir=str(work / "out"),
                work_dir=str(work),
            )
        )
        store = jobs.JobStore(settings.home, settings.profile)
        job = jobs.submit_script(store, scheduler, script, host=settings.host or "")
        print(f"{scan}: job {job.native_id} submitted, waiting", file=sys.stderr)
        [job] = jobs.wait_for(store, scheduler, [job.native_id], interval=settings.poll_interval)
    if job.state != "finished":
        raise HpcBridgeError(f"job {job.native_id} {job.state}: {job.reason}\n{job.log_tail}")
    # A new XNAT session: the job may have queued and run for longer than the first one lasts.
    with connect(settings) as xnat:
        uploaded = upload_outputs(xnat, scan, work / "out", recipe.outputs, {"job": job.native_id})
    for item in uploaded:
        print(f"{scan} {item['resource']}/{item['name']} {item['size']} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        convert(Address.parse(sys.argv[1]))
    except HpcBridgeError as exc:
        sys.exit(f"python-api.py: error: {exc}")
