"""``hpcbridge stage-in`` and ``stage-out``: the data path between XNAT and the cluster."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import HpcBridgeError, PartialFailure, TemporaryFailure, xnat_away
from ..units import human_size
from . import hints
from .app import main, settings_of
from .output import ProgressBar, echo, emit_json
from .params import Number


def _away_report_option(function: Any) -> Any:
    return click.option(
        "--away-report",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="FILE",
        help="When XNAT is away (exit code 75), also write the error and the wait XNAT asked "
        "for to FILE as JSON (a job chain's transfer jobs do, for the bridge).",
    )(function)


@contextlib.contextmanager
def _away_exits(report: Path | None) -> Iterator[None]:
    """XNAT away ends the command with exit code 75 (EX_TEMPFAIL) instead of 1, so that a job
    running it (a job chain's transfer job) tells "try again later" from a request that is
    wrong; ``report`` then holds what the bridge needs to wait it out."""
    if report is not None:
        # An earlier job's report in the same work folder must not outlive this job's outcome.
        with contextlib.suppress(OSError):
            report.unlink()
    try:
        yield
    except HpcBridgeError as exc:
        if not (isinstance(exc, TemporaryFailure) or xnat_away(exc)):
            raise
        retry_after = getattr(exc, "retry_after", None)
        if report is not None:
            from ..transport import LocalTransport

            said = {"transient": True, "for": "XNAT", "error": exc.message}
            text = json.dumps(dict(said, retry_after=retry_after), indent=1)
            # The exit code says it already; the report only adds the details.
            with contextlib.suppress(HpcBridgeError):
                LocalTransport().write_text(str(report), text)
        raise TemporaryFailure(exc.message, hint=hints.hint(exc), retry_after=retry_after) from None


def _shown_default(name: str, default: Any, kind: Any, text: str) -> Any:
    """An option whose help shows its default."""
    return click.option(name, default=default, show_default=True, type=kind, help=text)


@main.command("stage-in", short_help="Download scans, verify and unpack them, with a manifest.")
@click.argument("address")
@click.option("--scan", "scan_ids", multiple=True, metavar="ID", help="Scan ID (repeatable).")
@click.option(
    "--scan-type",
    "scan_types",
    multiple=True,
    metavar="GLOB",
    help="Scan type glob, e.g. '*T1*' (repeatable).",
)
@click.option(
    "--series", multiple=True, metavar="GLOB", help="Series description glob (repeatable)."
)
@click.option("--resource", default="DICOM", show_default=True, help="Resource to download.")
@click.option(
    "--dest",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Destination folder.",
)
@click.option("--allow-non-dicom", is_flag=True, help="Stage a resource that holds no DICOM.")
@_shown_default("--workers", 2, click.IntRange(1, 8), "Scans downloaded in parallel.")
@_shown_default(
    "--max-bytes",
    64 * 1024**3,
    click.IntRange(1),
    "Refuse a scan's zip that unpacks to more than this.",
)
@_shown_default(
    "--max-ratio", 200.0, Number(1), "Refuse zip entries that expand more than this (zip bombs)."
)
@_away_report_option
@click.pass_context
def stage_in_command(
    ctx: click.Context,
    address: str,
    scan_ids: tuple[str, ...],
    scan_types: tuple[str, ...],
    series: tuple[str, ...],
    resource: str,
    dest: Path,
    allow_non_dicom: bool,
    workers: int,
    max_bytes: int,
    max_ratio: float,
    away_report: Path | None,
) -> None:
    """Download scans' files, verify them, and unpack them with a manifest.

    ADDRESS is PROJECT/SUBJECT/EXPERIMENT (select scans with the options) or
    PROJECT/SUBJECT/EXPERIMENT/SCAN. Files land in
    DEST/<experiment>/scans/<scan>-<type>/resources/<resource>/files/ with manifest.json beside
    them; scans already staged and unchanged in XNAT are skipped. Exit code 75 when XNAT was
    away (could not be reached, or answered 408, 429 or 5xx): run it again later.

    \b
    Examples:
      hpcbridge stage-in PTV000/Haofei01/Haofei01_MR1/4 --dest /scratch/$USER/in
      hpcbridge stage-in PTV000/Haofei01/Haofei01_MR1 --scan-type '*T1*' --dest in
    """
    from ..stagein import Limits, Selection, stage_in
    from ..xnat import Address
    from .server import connect

    settings = settings_of(ctx)
    where = Address.parse(address)
    with _away_exits(away_report):
        bar = ProgressBar("stage-in", enabled=not (settings.quiet or settings.json))
        with connect(settings) as client:
            report = stage_in(
                client,
                where,
                dest,
                resource=resource,
                workers=workers,
                selection=Selection(scan_ids, scan_types, series),
                allow_non_dicom=allow_non_dicom,
                limits=Limits(max_total_bytes=max_bytes, max_ratio=max_ratio),
                progress=bar.add,
                on_total=bar.set_total,
            )
        bar.close()
        rows = _stage_in_rows(report)
        if settings.json:
            emit_json(rows)
        else:
            _echo_stage_in(rows)
        _finish(report.failed, len(rows))


def _stage_in_rows(report: Any) -> list[dict[str, Any]]:
    """One row per scan, staged, skipped or failed (``--json`` prints them as they are)."""
    rows = [
        {
            "scan": s.scan.id,
            "type": s.scan.type,
            "status": "skipped" if s.skipped else "staged",
            "folder": str(s.folder),
            "files": s.files,
            "bytes": s.bytes,
            "dicom_instances": s.dicom.get("instances", 0),
        }
        for s in report.staged
    ]
    return rows + [
        {"scan": scan.id, "type": scan.type, "status": "failed", "error": err.message}
        for scan, err in report.failed
    ]


def _echo_stage_in(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        if row["status"] == "failed":
            if len(rows) == 1:
                continue  # _finish reports the one failure as the error line itself
            echo(f"scan {row['scan']}: failed: {row['error']}", err=True)
        else:
            note = " (already staged, unchanged)" if row["status"] == "skipped" else ""
            echo(
                f"scan {row['scan']}: {row['files']} files, "
                f"{human_size(row['bytes'])} -> {row['folder']}{note}"
            )


def _finish(failed: list, total: int) -> None:
    """Exit 1 when everything failed, 3 when only some did (CLI.md); 75 when nothing was staged
    and every failure was XNAT away, as then the same command run later does it all. A partial
    success stays 3 whatever the failures were: 3 means the same on every command."""
    if not failed:
        return
    away = [err for _scan, err in failed if xnat_away(err)]
    if len(away) == len(failed) == total and total > 1:
        raise TemporaryFailure(
            f"{len(failed)} of {total} scans failed, XNAT away; first: {away[0].message}",
            hint=hints.hint(away[0]),
            retry_after=max((e.retry_after or 0 for e in away), default=0) or None,
        )
    scan, err = failed[0]
    if len(failed) == total:
        if total == 1:
            raise err
        raise PartialFailure(f"all {total} scans failed; first: {err.message}") from None
    raise PartialFailure(f"{len(failed)} of {total} scans failed")


@main.command("stage-out", short_help="Upload files into a scan's resource, verified.")
@click.argument("address")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--resource", metavar="LABEL", help="Target resource, e.g. NIFTI.")
@click.option("--format", "fmt", metavar="F", help="Resource format when it is created.")
@click.option("--content", metavar="C", help="Resource content when it is created.")
@click.option("--overwrite", is_flag=True, help="Replace existing files with different content.")
@click.option("--assessor", metavar="LABEL", help="Upload to this assessor of the experiment.")
@_shown_default(
    "--inout", "out", click.Choice(["in", "out"]), "Which assessor resources (with --assessor)."
)
@click.option("--no-zip", is_flag=True, help="Upload small files one by one, not as one zip.")
@click.option(
    "--spec",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Upload a job's output folder as a run does: each output into the recipe's resource, "
    "with a provenance record (the file `hpcbridge run --chain` writes for its stage-out jobs).",
)
@_away_report_option
@click.pass_context
def stage_out_command(
    ctx: click.Context,
    address: str,
    paths: tuple[Path, ...],
    resource: str,
    fmt: str | None,
    content: str | None,
    overwrite: bool,
    assessor: str | None,
    inout: str,
    no_zip: bool,
    spec: Path | None,
    away_report: Path | None,
) -> None:
    """Upload files (or folders' files) into a resource of a scan, then verify the listing.

    An identical file already in XNAT is skipped; a different one is an error unless
    --overwrite. Nothing is deleted. dcm2niix outputs get format/content labels. Exit code 75
    when XNAT was away (could not be reached, or answered 408, 429 or 5xx): run it again later.

    \b
    Examples:
      hpcbridge stage-out PTV000/Haofei01/Haofei01_MR1/4 --resource NIFTI out/*.nii.gz out/*.json
      hpcbridge stage-out PTV000/Haofei01/Haofei01_MR1 --assessor QC1 --resource PDF report.pdf
    """
    from ..stageout import collect, resolve_target, stage_out
    from ..xnat import Address
    from .server import connect

    settings = settings_of(ctx)
    where = Address.parse(address)
    if spec is not None:
        if resource or assessor or len(paths) != 1:
            raise click.UsageError("--spec takes one output folder and no --resource or --assessor")
        with _away_exits(away_report):
            _stage_out_spec(settings, where, paths[0], spec)
        return
    if not resource:
        raise click.UsageError("Missing option '--resource'.")
    files = collect(paths)
    bar = ProgressBar("stage-out", enabled=not (settings.quiet or settings.json))
    bar.set_total(sum(f.size for f in files))
    with _away_exits(away_report), connect(settings) as client:
        target = resolve_target(client, where, resource, assessor=assessor, inout=inout)
        report = stage_out(
            client,
            target,
            files,
            overwrite=overwrite,
            fmt=fmt,
            content=content,
            batch_small=not no_zip,
            progress=bar.add,
        )
    bar.close()
    _echo_stage_out(report, settings.json)


def _echo_stage_out(report: Any, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "target": report.target,
                "uploaded": report.uploaded,
                "skipped": report.skipped,
                "bytes": report.bytes,
                "created_resource": report.created_resource,
                "verified": True,
            }
        )
        return
    echo(
        f"{report.target}: uploaded {len(report.uploaded)} file(s) "
        f"({human_size(report.bytes)}), skipped {len(report.skipped)} identical; "
        "verified against XNAT's listing"
    )


def _stage_out_spec(settings: Any, where: Any, out: Path, spec_file: Path) -> None:
    """The stage-out step of a job chain: upload as the run would, then report what went up."""
    from ..errors import StageError
    from ..outputs import upload_outputs
    from ..recipes import Output
    from .server import connect

    try:
        spec = json.loads(spec_file.read_text())
        outputs = [Output(**o) for o in spec["outputs"]]
        provenance = dict(spec["provenance"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"{spec_file}: not a stage-out spec written by hpcbridge ({exc})"
        ) from None
    if not out.is_dir():
        raise StageError(f"{out}: no such output folder")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        # the compute job's own record of when it ended, for the provenance
        provenance["ended"] = json.loads(Path(spec["status_file"]).read_text())["end"]
    with connect(settings) as client:
        uploaded = upload_outputs(client, where, out, outputs, provenance)
    if spec.get("report"):
        from ..transport import LocalTransport

        # whole or not at all: the bridge reads it once this job has ended
        LocalTransport().write_text(spec["report"], json.dumps({"uploaded": uploaded}, indent=1))
    if settings.json:
        emit_json({"target": str(where), "uploaded": uploaded, "verified": True})
        return
    resources = sorted({u["resource"] for u in uploaded})
    echo(
        f"{where}: uploaded {len(uploaded)} file(s) into {', '.join(resources)}; "
        "verified against XNAT's listing"
    )
