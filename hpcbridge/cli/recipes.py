"""``hpcbridge recipes list|show|new`` and ``hpcbridge render``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from ..errors import RecipeError
from .app import main, settings_of
from .output import echo, emit_document, emit_json, emit_table, warn

recipes_option = click.option(
    "--recipes",
    "recipe_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder of lab recipes, searched first (repeatable).",
)

SCAFFOLD = '''# {name}: a lab recipe for hpcbridge (see docs/recipes.md for every key).
name = "{name}"
description = "What this recipe does, in one line"
version = "1"

# Parameters users can change with --set NAME=VALUE. Types: str, int, float, bool.
[parameters.threshold]
type = "float"
default = 0.5
help = "An example parameter; use it in the command as {{{{ params.threshold }}}}"

# Scheduler-neutral requests; hpcbridge turns them into PBS, Torque or Slurm directives.
[resources]
cpus = 1
memory = "2GB"        # e.g. 512MB, 4GB
walltime = "00:30:00" # HH:MM:SS, hours may exceed 24
# queue = "defaultQ"
# account = "MYPROJECT"

# Modules are loaded where `module` exists; elsewhere the tools must be on PATH.
[environment]
modules = ["dcm2niix"]

# What to stage in, and which scans this recipe applies to.
[inputs]
resource = "DICOM"
scan_types = ["*"]

# Which result files go back to XNAT, and into which resource of the scan.
[[outputs]]
glob = "*.nii.gz"
resource = "NIFTI"
format = "NIFTI"
content = "IMAGE"

# The command: a Jinja template. Every {{{{ value }}}} is shell-quoted for you.
# Variables: input_dir, output_dir, work_dir, params.NAME, cpus, memory_mb, walltime, scan.
[run]
command = """
dcm2niix -z y -o {{{{ output_dir }}}} {{{{ input_dir }}}}
"""
'''


@main.group("recipes")
def recipes_group() -> None:
    """List, inspect and scaffold conversion recipes.

    \b
    Examples:
      hpcbridge recipes list
      hpcbridge recipes show dcm2niix
      hpcbridge recipes new t1-lab --dir ~/lab-recipes
    """


def _set_values(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {pair!r} must look like NAME=VALUE")
        out[key] = value
    return out


def _row(
    name: str | None, description: str, origin: str, file: Path, error: str | None
) -> dict[str, Any]:
    return dict(name=name, description=description, origin=origin, file=str(file), error=error)


@recipes_group.command("list")
@recipes_option
@click.pass_context
def recipes_list(ctx: click.Context, recipe_dirs: tuple[Path, ...]) -> None:
    """The recipes found, and where each came from (a lab's overrides a built-in).

    Recipes that cannot be used (invalid, unsafe, or in a folder every user may write) are
    listed after the others with the reason; they never hide the good ones.

    \b
    Examples:
      hpcbridge recipes list
      hpcbridge recipes list --recipes ~/lab-recipes
    """
    from ..recipes import discover

    settings = settings_of(ctx)
    found = discover(list(recipe_dirs), settings.home)
    rows = [
        _row(r.name, r.description, r.origin, r.source, None)
        for r in sorted(found.values(), key=lambda r: r.name)
    ]
    broken = [_row(b.name or None, "", b.origin, b.path, b.error) for b in found.broken]
    if settings.json:
        emit_json(rows + broken)
        return
    emit_table(rows, [("name", "NAME"), ("origin", "FROM"), ("description", "DESCRIPTION")])
    if broken:
        echo(f"\nbroken, not used ({len(broken)}):", multiline=True)
        for row in broken:
            echo(f"  {row['error']}")


@recipes_group.command("show")
@click.argument("name")
@recipes_option
@click.pass_context
def recipes_show(ctx: click.Context, name: str, recipe_dirs: tuple[Path, ...]) -> None:
    """A recipe's parameters, defaults, resources, inputs, outputs and command.

    \b
    Example:
      hpcbridge recipes show dcm2niix
    """
    from ..recipes import find, format_walltime

    settings = settings_of(ctx)
    recipe = find(name, list(recipe_dirs), settings.home)
    res = recipe.resources
    info: dict[str, Any] = {
        "name": recipe.name,
        "description": recipe.description,
        "file": str(recipe.source),
        "origin": recipe.origin,
        "parameters": {
            p.name: {"type": p.type, "default": p.default, "help": p.help}
            for p in recipe.parameters.values()
        },
        "resources": dict(asdict(res), walltime=format_walltime(res.walltime)),
        "modules": list(recipe.modules),
        "inputs": {"resource": recipe.input_resource, "scan_types": list(recipe.scan_types)},
        "outputs": [o.__dict__ for o in recipe.outputs],
        "command": recipe.command,
    }
    if settings.json:
        emit_json(info)
        return
    echo(f"{recipe.name}: {recipe.description}")
    echo(f"  from {recipe.origin} ({recipe.source})")
    echo("\nparameters:", multiline=True)
    for p in recipe.parameters.values():
        echo(f"  {p.name} ({p.type}, default {p.default!r})  {p.help}")
    echo()
    echo(
        f"resources: {res.cpus} cpu, {res.memory_mb} MB, walltime "
        f"{format_walltime(res.walltime)}"
        + (f", queue {res.queue}" if res.queue else "")
        + (f", account {res.account}" if res.account else "")
        + (f", {res.gpus} gpu" if res.gpus else "")
    )
    if recipe.modules:
        echo(f"modules: {', '.join(recipe.modules)}")
    echo(f"inputs: resource {recipe.input_resource}, scan types {', '.join(recipe.scan_types)}")
    for o in recipe.outputs:
        echo(
            f"output: {o.glob} -> resource {o.resource}"
            + (f" ({o.format}/{o.content})" if o.format else "")
        )
    echo("\ncommand:\n" + recipe.command.rstrip(), multiline=True)


@recipes_group.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write it [default: $HPCBRIDGE_HOME/recipes].",
)
@click.pass_context
def recipes_new(ctx: click.Context, name: str, folder: Path | None) -> None:
    """Write a commented recipe to start from, and check that it validates.

    \b
    Example:
      hpcbridge recipes new t1-lab --dir ~/lab-recipes
    """
    from ..recipes import NAME, load_recipe

    if not NAME.match(name):
        raise RecipeError(f"recipe name {name!r} must be a letter then letters, digits, '_' or '-'")
    folder = folder or settings_of(ctx).home / "recipes"
    target = folder / f"{name}.toml"
    if target.exists():
        raise RecipeError(f"{target} already exists")
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text(SCAFFOLD.format(name=name))
    load_recipe(target)
    echo(f"wrote {target}; edit it, then: hpcbridge recipes show {name} --recipes {folder}")


def _folder_option(flag: str, dest: str, help: str, *, required: bool = False) -> Any:
    return click.option(flag, dest, required=required, type=click.Path(path_type=Path), help=help)


@main.command("render")
@click.argument("recipe")
@click.option(
    "--scheduler",
    type=click.Choice(["pbs", "torque", "slurm", "local"]),
    help="Scheduler [default: the profile's].",
)
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Recipe parameter.")
@_folder_option("--input", "input_dir", "Folder the job reads (staged DICOM).", required=True)
@_folder_option("--output", "output_dir", "Folder the job writes.", required=True)
@_folder_option(
    "--work", "work_dir", "Job work folder (status files, logs) [default: parent of --output]."
)
@click.option("--name", help="Job name [default: the recipe's].")
@click.option(
    "--scan",
    "scan_address",
    metavar="PROJECT/SUBJECT/SESSION/SCAN",
    help="The scan the job is for: fills the recipe's scan.* variables (asks XNAT its type).",
)
@click.option("--queue", help="Queue or partition (overrides the recipe).")
@click.option("--account", help="Account or project (overrides the recipe).")
@click.option("--mail", help="Mail address for job begin/end/abort.")
@click.option(
    "-o",
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the script here instead of printing it.",
)
@recipes_option
@click.pass_context
def render_command(
    ctx: click.Context,
    recipe: str,
    scheduler: str | None,
    sets: tuple[str, ...],
    input_dir: Path,
    output_dir: Path,
    work_dir: Path | None,
    name: str | None,
    scan_address: str | None,
    queue: str | None,
    account: str | None,
    mail: str | None,
    out_file: Path | None,
    recipe_dirs: tuple[Path, ...],
) -> None:
    """Render a recipe into a job script without submitting anything.

    \b
    Examples:
      hpcbridge render dcm2niix --scheduler pbs --input /scratch/in --output /scratch/out
      hpcbridge render dcm2niix --scheduler slurm --set gzip=false --input in --output out -o job.sh
      hpcbridge render my-recipe --scan PTV000/Haofei01/Haofei01_MR1/4 --input in --output out
    """
    from ..recipes import find, render_script, uses_scan_variables

    settings = settings_of(ctx)
    found = find(recipe, list(recipe_dirs), settings.home)
    scan = _scan_variables(settings, scan_address) if scan_address else None
    if scan is None and uses_scan_variables(found):
        warn(
            f"recipe {found.name} uses scan.* variables; without --scan "
            "they hold placeholders (P, S, E, 1, T1)"
        )
    kind = scheduler or settings.scheduler
    # The recipe's own queue/account win over the profile's, an option over both.
    project = account or found.resources.account or settings.account
    script = render_script(
        found,
        kind,
        values=found.values(_set_values(sets)),
        input_dir=str(input_dir.absolute()),
        output_dir=str(output_dir.absolute()),
        work_dir=str((work_dir or output_dir.absolute().parent).absolute()),
        name=name,
        scan=scan,
        queue=queue or found.resources.queue or settings.queue,
        account=project,
        mail=mail,
    )
    _warn_without_project(settings, kind, project)
    _write_script(script, out_file)


def _warn_without_project(settings: Any, kind: str, project: str | None) -> None:
    # Torque's -A and the Slurm PBS wrappers' accounts are optional; PBS Pro sites often are not.
    flavour = settings.pbs_flavour if settings.scheduler == "pbs" else None
    if kind == "pbs" and not project and flavour in (None, "pbspro"):
        warn(
            "the script has no project: PBS Pro sites such as Artemis reject jobs without "
            "-P PROJECT (pass --account PROJECT, or set account in the profile)"
        )


def _write_script(script: str, out_file: Path | None) -> None:
    if out_file is None:
        emit_document(script)
        return
    tmp = out_file.with_name(f".{out_file.name}.part")
    tmp.write_text(script)
    tmp.chmod(0o755)
    tmp.replace(out_file)
    echo(f"wrote {out_file}", err=True)


def _scan_variables(settings: Any, text: str) -> dict[str, str]:
    """The scan.* values of the scan at ``text``, its type and description from XNAT."""
    from ..errors import StageError
    from ..recipes import scan_variables
    from ..xnat import Address
    from ..xnat.browse import scans_of
    from ..xnat.model import ScanRef
    from .server import connect

    address = Address.parse(text)
    if address.depth != 4:
        raise StageError(f"--scan needs PROJECT/SUBJECT/SESSION/SCAN, not {text!r}")
    with connect(settings) as client:
        experiment_id, label, scans = scans_of(client, address)
    found = next((s for s in scans if s.id == address.scan), None)
    if found is None:
        raise StageError(
            f"no scan {address.scan!r} in {Address(address.project, address.subject, label)}",
            hint=f"`hpcbridge ls {Address(address.project, address.subject, label)}` lists them",
        )
    ref = ScanRef(
        address.project or "",
        address.subject or "",
        experiment_id,
        label,
        found.id,
        found.type,
        found.series_description,
        found.quality,
    )
    return scan_variables(ref)
