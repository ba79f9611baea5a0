"""``hpcbridge ls``: browse projects down to a scan's files."""

from __future__ import annotations

import click

from .app import main, settings_of
from .output import echo, emit_json, emit_table

LS_COLUMNS = {
    "projects": [("ID", "ID"), ("name", "NAME"), ("description", "DESCRIPTION")],
    "subjects": [("label", "LABEL"), ("ID", "ID")],
    "experiments": [("label", "LABEL"), ("ID", "ID"), ("date", "DATE"), ("xsiType", "TYPE")],
    "scans": [
        ("ID", "SCAN"),
        ("type", "TYPE"),
        ("series_description", "SERIES DESCRIPTION"),
        ("quality", "QUALITY"),
        ("file_count", "FILES"),
        ("file_size", "BYTES"),
    ],
    "project-scans": [
        ("subject_label", "SUBJECT"),
        ("experiment_label", "EXPERIMENT"),
        ("scan_ID", "SCAN"),
        ("type", "TYPE"),
        ("series_description", "SERIES DESCRIPTION"),
        ("quality", "QUALITY"),
    ],
}


@main.command("ls", short_help="Browse projects, subjects, sessions, scans and files.")
@click.argument("address", required=False, default="")
@click.option(
    "--scans",
    "all_scans",
    is_flag=True,
    help="With a PROJECT: every scan of every session, in one request.",
)
@click.pass_context
def ls_command(ctx: click.Context, address: str, all_scans: bool) -> None:
    """List projects, subjects, experiments, scans, or a scan's resources and files.

    ADDRESS is PROJECT[/SUBJECT[/EXPERIMENT[/SCAN]]], by labels (accession IDs such as
    XNAT_E00001 work where XNAT accepts them); empty lists the projects.

    \b
    Examples:
      hpcbridge ls
      hpcbridge ls PTV000/Haofei01/Haofei01_MR1
      hpcbridge ls PTV000 --scans
      hpcbridge --json ls PTV000/Haofei01/Haofei01_MR1/4
    """
    from ..xnat import Address
    from ..xnat.browse import ls
    from .server import connect

    settings = settings_of(ctx)
    where = Address.parse(address)
    with connect(settings) as client:
        listing = ls(client, where, all_scans=all_scans)
    if settings.json:
        emit_json(listing.rows())
        return
    if not listing.items:
        echo(f"no {listing.kind.replace('project-', '')} at {where or 'the server'}", err=True)
        return
    if listing.kind == "resources":
        for res in listing.items:
            echo(f"{res.label}  format={res.format}  {res.file_count} files  {res.file_size} bytes")
            emit_table(
                [{"path": f.path, "size": f.size, "digest": f.digest} for f in res.files],
                [("path", "  FILE"), ("size", "SIZE"), ("digest", "MD5")],
                indent="  ",
            )
        return
    emit_table(listing.rows(), LS_COLUMNS[listing.kind])
