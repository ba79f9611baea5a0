"""Planning a run: the scans that match, the ones converted already, the run and its planned jobs
in the ledger; and the job scripts a dry run shows. Where a run's folders go is decided here."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import chain
from ..config import Settings
from ..errors import ConfigError, StageError, Step
from ..ledger import Ledger, Run, RunState
from ..recipes import Recipe, find, render_script, scan_variables
from ..stagein import safe_name, scan_folder
from ..xnat.address import Address
from ..xnat.browse import project_scans, scans_of
from ..xnat.client import XnatClient
from ..xnat.model import Scan, ScanRef


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for: a recipe, where, which scans, which parameter values."""

    recipe: str
    address: str
    scan_ids: tuple[str, ...] = ()
    scan_types: tuple[str, ...] = ()
    sets: dict[str, str] = field(default_factory=dict)
    max_queued: int | None = None
    force: bool = False
    recipe_dirs: tuple[Path, ...] = ()
    #: stage-in -> compute -> stage-out as dependent jobs on the cluster (see chain.py)
    chain: bool = False


@dataclass
class Plan:
    run: Run | None
    recipe: Recipe
    values: dict[str, Any]
    scans: list[ScanRef]
    skipped: list[tuple[ScanRef, str]]
    #: ``run`` is an unfinished run with the same arguments, carried on rather than repeated.
    resumed: bool = False


def plan_scans(
    client: XnatClient, address: Address, *, ids: Sequence[str] = (), types: Sequence[str] = ()
) -> list[ScanRef]:
    """Every scan below ``address`` that matches the IDs or type globs (all when neither)."""
    project = address.project or ""
    if address.depth >= 3:
        experiment_id, label, scans = scans_of(
            client, Address(address.project, address.subject, address.experiment)
        )
        refs = [
            ScanRef(
                project,
                address.subject or "",
                experiment_id,
                label,
                s.id,
                s.type,
                s.series_description,
                s.quality,
            )  # fmt: skip
            for s in scans
        ]
        if address.scan:
            refs = [r for r in refs if r.scan_id == address.scan]
    else:
        refs = project_scans(client, project)
        if address.subject:
            refs = [r for r in refs if r.subject_label == address.subject]
    wanted_ids, globs = tuple(ids), tuple(types)
    if wanted_ids or globs:
        refs = [
            r
            for r in refs
            if r.scan_id in wanted_ids or any(fnmatch.fnmatchcase(r.type, g) for g in globs)
        ]
    return sorted(refs, key=lambda r: (r.subject_label, r.experiment_label, _scan_order(r)))


def _scan_order(ref: ScanRef) -> tuple[int, str]:
    return (int(ref.scan_id), "") if ref.scan_id.isdigit() else (1 << 30, ref.scan_id)


def recipe_of(settings: Settings, name: str, dirs: Sequence[Path]) -> Recipe:
    return find(name, list(dirs), settings.home)


def start_run(
    settings: Settings,
    client: XnatClient,
    ledger: Ledger | None,
    request: RunRequest,
    *,
    dry_run: bool = False,
) -> Plan:
    """Plan the scans and (unless ``dry_run``) record the run and one planned job per scan."""
    work_root(settings)  # a profile that cannot place the data fails before anything is recorded
    if request.chain:
        chain.transfer_queue(settings)  # so does a PBS chain whose transfers could not reach XNAT
    recipe = recipe_of(settings, request.recipe, request.recipe_dirs)
    values = recipe.values(dict(request.sets))
    address = Address.parse(request.address)
    types = request.scan_types or (() if request.scan_ids else recipe.scan_types)
    if types == ("*",) and not request.scan_ids:
        types = ()
    scans = _scans(client, address, request, types)
    todo, skipped = _not_done(ledger, request, recipe, values, scans)
    if dry_run or ledger is None:
        return Plan(None, recipe, values, todo, skipped)
    options = {
        "scan_ids": list(request.scan_ids),
        "scan_types": list(types),
        "max_queued": request.max_queued or settings.max_queued,
        "recipe_dirs": [str(p) for p in request.recipe_dirs],
        "recipe_version": recipe.version,
        "chain": request.chain,
    }
    # The same `run` repeated (after a crash, a lost terminal) carries on with the run it
    # started: planning its unfinished scans in a new run would submit and upload them twice.
    run = None
    if not request.force:
        run = _unfinished_twin(ledger, settings.profile, recipe.name, values, str(address), options)
    resumed = run is not None
    if run is None:
        if not todo:
            return Plan(None, recipe, values, todo, skipped)
        run = ledger.create_run(
            recipe=recipe.name,
            params=values,
            target=str(address),
            profile=settings.profile,
            options=options,
        )
    _add_jobs(ledger, run, todo)
    return Plan(run, recipe, values, todo, skipped, resumed=resumed)


def _scans(
    client: XnatClient, address: Address, request: RunRequest, types: tuple[str, ...]
) -> list[ScanRef]:
    scans = plan_scans(client, address, ids=request.scan_ids, types=types)
    if not scans:
        raise StageError(
            f"no scan below {address} matches "
            + (", ".join([*request.scan_ids, *types]) or "the recipe's scan types"),
            step=Step.LS,
            address=str(address),
        )
    return scans


def _not_done(
    ledger: Ledger | None,
    request: RunRequest,
    recipe: Recipe,
    values: dict[str, Any],
    scans: list[ScanRef],
) -> tuple[list[ScanRef], list[tuple[ScanRef, str]]]:
    """The scans to convert, and those skipped as converted already with why."""
    todo: list[ScanRef] = []
    skipped: list[tuple[ScanRef, str]] = []
    for ref in scans:
        done = None
        if ledger is not None and not request.force:
            done = ledger.find_done(recipe.name, values, ref.address)
        if done is not None:
            skipped.append((ref, f"already converted by run {done.run_id} (use --force to redo)"))
        else:
            todo.append(ref)
    return todo, skipped


def _add_jobs(ledger: Ledger, run: Run, todo: list[ScanRef]) -> None:
    tag = run_tag(ledger, run)
    for ref in todo:
        ledger.add_job(
            run.id,
            address=ref.address,
            project=ref.project,
            subject=ref.subject_label,
            experiment=ref.experiment_label,
            experiment_id=ref.experiment_id,
            scan=ref.scan_id,
            scan_type=ref.type,
            # Unique, and recognisable in qstat: run, experiment, scan. The scheduler is asked
            # for it by name after a crash, so it must not match another ledger's run 1.
            name=f"hb{run.id}-{tag}_{safe_name(ref.experiment_label)}_{safe_name(ref.scan_id)}",
        )


def run_tag(ledger: Ledger, run: Run) -> str:
    """Four hex digits telling this run from the runs of the same number in other ledgers
    (another user's, another HPCBRIDGE_HOME) in a shared scheduler's job names."""
    seed = f"{ledger.path.absolute()}|{run.id}|{run.created}"
    return hashlib.sha256(seed.encode()).hexdigest()[:4]


def _unfinished_twin(
    ledger: Ledger,
    profile: str,
    recipe: str,
    values: dict[str, Any],
    target: str,
    options: dict[str, Any],
) -> Run | None:
    """The latest active run of this profile made with the same recipe, values and scans."""
    same = ("scan_ids", "scan_types", "recipe_version")
    for run in reversed(ledger.runs(profile)):
        if (
            run.state is RunState.ACTIVE
            and (run.recipe, run.target, run.params) == (recipe, target, values)
            and all(run.options.get(k) == options[k] for k in same)
            and bool(run.options.get("chain")) == options["chain"]
        ):
            return run
    return None


def dry_run_scripts(settings: Settings, plan: Plan, *, chain_steps: bool = False) -> list[str]:
    """The job script the first planned scan would get (a chain's three), for ``--dry-run``."""
    ref = plan.scans[0]
    root = work_root(settings) + "/run-N"
    folder = root + "/" + scan_relative(ref.experiment_label, ref)
    # No cluster is asked in a dry run: the flavour is the profile's, PBS Pro when unset.
    pbs_torque = settings.scheduler == "pbs" and settings.pbs_flavour == "torque"
    template = "torque" if pbs_torque else settings.scheduler
    name = f"hbN_{safe_name(ref.experiment_label)}_{safe_name(ref.scan_id)}"
    compute = job_script(settings, plan.recipe, template, plan.values, folder, name, ref)
    if not chain_steps:
        return [compute]
    transfers = {
        step: chain.transfer_script(
            step,
            template,
            settings=settings,
            bridge=chain.bridge_command(settings, local=not settings.host),
            root=root,
            folder=folder,
            name=name,
            ref=ref,
            input_resource=plan.recipe.input_resource,
        )
        for step in ("stage-in", "stage-out")
    }
    return [transfers["stage-in"], compute, transfers["stage-out"]]


def job_script(
    settings: Settings,
    recipe: Recipe,
    template: str,
    values: dict[str, Any],
    folder: str,
    name: str,
    ref: ScanRef,
) -> str:
    """The job script for one scan's folder; the recipe's queue and account win over the
    profile's."""
    return render_script(
        recipe,
        template,
        values=values,
        input_dir=f"{folder}/resources/{safe_name(recipe.input_resource)}/files",
        output_dir=f"{folder}/out",
        work_dir=folder,
        name=name,
        scan=scan_variables(ref),
        queue=recipe.resources.queue or settings.queue,
        account=recipe.resources.account or settings.account,
    )


def work_root(settings: Settings) -> str:
    """Where runs keep their folders, on the side of the transport that runs the jobs."""
    if settings.work_root:
        root = settings.work_root
    elif settings.host:
        raise ConfigError(
            f"profile {settings.profile!r} submits to {settings.host} but sets no work_root: "
            "the absolute folder on the cluster where runs keep their data",
            hint='add e.g. work_root = "/scratch/PROJECT/hpcbridge" to the profile',
        )
    else:
        root = str(settings.home.absolute() / "work")
    if not root.startswith("/"):
        raise ConfigError(f"work_root must be an absolute path, not {root!r}")
    return root.rstrip("/")


def scan_relative(experiment: str, ref: ScanRef) -> str:
    """The same folder stage-in makes for the scan: ``<experiment>/scans/<scan>-<type>``."""
    return f"{safe_name(experiment)}/scans/{scan_folder(Scan(ref.scan_id, ref.type))}"
