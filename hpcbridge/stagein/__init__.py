"""Stage-in: get scans' files from XNAT onto the local (cluster) filesystem, intact.

For each selected scan: list the resource's files (names, sizes, md5 digests), stream the
resource zip to ``*.part`` in a staging folder beside the destination, check the zip (entries,
CRCs, sizes, digests) while extracting it safely, summarise the DICOM with pydicom, write
``manifest.json``, and only then rename the finished folder into place. A failure at any point
leaves no folder that looks complete; a re-run skips scans whose manifest still verifies against
both the files on disk and XNAT's listing.

The package: ``layout`` (selection, limits, outcome, folder names), ``fetch`` (one scan's plan,
download and manifest, and the staging folders concurrent stage-ins share) and ``unzip``
(checks while unpacking, later verification).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import HpcBridgeError, StageError, XnatNotFoundError
from ..units import human_size
from ..xnat.address import Address
from ..xnat.browse import require, scans_of
from ..xnat.client import XnatClient
from ..xnat.model import Scan
from .fetch import _Plan, _plan
from .layout import STAGING as STAGING
from .layout import Limits, Progress, Selection, StagedScan, StageInReport
from .layout import safe_name as safe_name
from .layout import scan_folder as scan_folder
from .unzip import md5_of, open_manifest  # noqa: F401

#: The defaults of stage_in: every scan, and the limits' defaults (both frozen).
EVERY_SCAN = Selection()
DEFAULT_LIMITS = Limits()


def stage_in(
    client: XnatClient,
    address: Address,
    dest: Path,
    *,
    selection: Selection = EVERY_SCAN,
    resource: str = "DICOM",
    allow_non_dicom: bool = False,
    workers: int = 2,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
) -> StageInReport:
    """Stage in the selected scans of the experiment at ``address``."""
    experiment_id, experiment_label, chosen = _chosen(client, address, selection)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    client.ensure_session()  # one login before the threads share the session
    base = str(Address(address.project, address.subject, address.experiment))
    report = StageInReport()
    plans = []
    for scan in chosen:
        try:
            plans.append(_plan(client, experiment_id, experiment_label, scan, resource, dest, base))
        except XnatNotFoundError:
            report.failed.append((scan, StageError(f"{base}/{scan.id} has no resource {resource}")))
    # Verify each staged copy once: hashing is the expensive part of a re-run, and a second
    # look could disagree with the first (a file changing meanwhile) and drop a scan from both.
    fresh = [p.up_to_date() for p in plans]
    todo = [p for p, ok in zip(plans, fresh, strict=True) if not ok]
    _check_space(dest, sum(p.total for p in todo), limits)
    if on_total is not None:
        on_total(sum(p.total for p in todo))
    report.staged += [p.skipped() for p, ok in zip(plans, fresh, strict=True) if ok]
    _fetch_all(todo, report, workers, lambda p: p.fetch(client, allow_non_dicom, limits, progress))
    report.staged.sort(key=lambda s: s.scan.id)
    return report


def _chosen(
    client: XnatClient, address: Address, selection: Selection
) -> tuple[str, str, list[Scan]]:
    """The experiment's ID and label, and its scans that ``selection`` (and the address) pick."""
    if address.depth < 3:
        raise StageError("stage-in needs an experiment: PROJECT/SUBJECT/EXPERIMENT[/SCAN]")
    if address.scan:
        selection = Selection(
            ids=(*selection.ids, address.scan), types=selection.types, series=selection.series
        )
    experiment_id, experiment_label, candidates = scans_of(client, address)
    chosen = [s for s in candidates if selection.matches(s)]
    if not chosen:
        if address.scan:
            require(client, address)
        raise StageError(
            f"no scan of {address} matches the selection "
            f"(scans there: {', '.join(s.id for s in candidates) or 'none'})"
        )
    return experiment_id, experiment_label, chosen


def _fetch_all(
    todo: list[_Plan],
    report: StageInReport,
    workers: int,
    fetch: Callable[[_Plan], StagedScan],
) -> None:
    """Run ``fetch`` for every plan in ``workers`` threads, into ``report``."""
    lock = threading.Lock()

    def run(plan: _Plan) -> None:
        try:
            staged = fetch(plan)
        except HpcBridgeError as exc:
            with lock:
                report.failed.append((plan.scan, exc))
            return
        with lock:
            report.staged.append(staged)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        list(pool.map(run, todo))


def _check_space(dest: Path, needed: int, limits: Limits) -> None:
    # The zip and the extracted files coexist until the zip is removed.
    want = 2 * needed + limits.min_free_bytes
    free = shutil.disk_usage(dest).free
    if needed and free < want:
        raise StageError(
            f"not enough free space in {dest}: need {human_size(want)}, have {human_size(free)}",
            hint="free space or choose another --dest",
        )
