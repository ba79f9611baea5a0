"""A job's outputs into XNAT, the way runs upload them.

Two places upload a run's outputs: the bridge itself (``hpcbridge run`` / ``sync``) and, in a job
chain, the stage-out job on the cluster (``hpcbridge stage-out --spec``). Both go through
:func:`upload_outputs`, so both rename outputs to names XNAT can address, sort them into the
recipe's output resources, and upload a provenance record beside them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import StageError, XnatNotFoundError
from .recipes import Output
from .stageout.files import (
    SAFE_PATH,
    LocalFile,
    Secrets,
    check_file,
    kind_of,
    link_refusal,
    open_folder,
    read_link,
    refusal,
    secret_ids,
    subfolder,
)
from .stageout.upload import Target, remote_files, resolve_target, stage_out
from .xnat.address import Address
from .xnat.client import XnatClient

__all__ = ["PROVENANCE_FILE", "SCAN", "upload_outputs"]

log = logging.getLogger(__name__)

PROVENANCE_FILE = "hpcbridge-provenance.json"
#: What a refused output keeps from XNAT: every output of its scan.
SCAN = "of this scan"
#: A sidecar is read for its converter version; a "sidecar" of gigabytes is not read whole.
SIDECAR_LIMIT = 1024 * 1024


def upload_outputs(
    client: XnatClient,
    address: Address,
    out: Path,
    outputs: Sequence[Output],
    provenance: dict[str, Any],
    *,
    root: Path | None = None,
    home: Path | None = None,
) -> list[dict[str, Any]]:
    """Upload what the job wrote in ``out`` into the scan at ``address``; the files uploaded.

    ``provenance`` is the record of what made the outputs (recipe, parameters, job); the
    converter version, the resource and its files are added per resource. The upload replaces
    each resource's contents: files of the same name are overwritten, and once the new files
    are verified, files an earlier attempt left under other names are deleted, so that the
    resource holds exactly this attempt's outputs (the ledger decides what is done).

    The job wrote ``out``, so nothing in it is trusted to be what it seems: a symbolic link
    anywhere in it (matched by an output pattern or not; or ``out`` itself, or any folder
    between ``root`` and it), a FIFO, socket or device, or one of hpcbridge's secret files
    (those of ``home``, by default this process's) is refused with a StageError naming it, and
    then nothing of the scan is uploaded: every output of every resource is checked before the
    first request that changes anything.
    """
    secrets = secret_ids(home, near=[out])
    fd = open_folder(out, below=root, scope=SCAN)
    try:
        _refuse_links_and_specials(fd, out)
        _safe_output_names(fd)
        uploaded: list[dict[str, Any]] = []
        for resource, found in _outputs_by_resource(fd, out, outputs, secrets).items():
            uploaded += _upload_resource(
                client, address, (fd, out), outputs, dict(provenance), resource, found
            )
    finally:
        os.close(fd)
    return uploaded


def _outputs_by_resource(
    fd: int, out: Path, outputs: Sequence[Output], secrets: Secrets
) -> dict[str, list[LocalFile]]:
    """What the recipe's patterns match in the open output folder, checked, by resource."""
    by_resource: dict[str, list[LocalFile]] = {}
    for output in outputs:
        found = by_resource.setdefault(output.resource, [])
        for rel in _matches(fd, out, output.glob):
            if all(f.path != out / rel for f in found):
                size, ident = check_file(
                    rel, dir_fd=fd, shown_as=out / rel, secrets=secrets, scope=SCAN
                )
                found.append(LocalFile(out / rel, Path(rel).name, size, identity=ident))
    if not any(by_resource.values()):
        raise StageError(
            f"the job wrote no output matching {', '.join(o.glob for o in outputs)} in {out}"
        )
    return {r: _named(found) for r, found in by_resource.items() if found}


def _upload_resource(
    client: XnatClient,
    address: Address,
    folder: tuple[int, Path],
    outputs: Sequence[Output],
    provenance: dict[str, Any],
    resource: str,
    found: list[LocalFile],
) -> list[dict[str, Any]]:
    """One resource's outputs and their provenance record (written into ``folder``, the open
    output folder and its path), uploaded and verified; what went up."""
    fd, out = folder
    _write_provenance(fd, provenance, resource, found)
    size, ident = check_file(PROVENANCE_FILE, dir_fd=fd, shown_as=out / PROVENANCE_FILE, scope=SCAN)
    files = [*found, LocalFile(out / PROVENANCE_FILE, PROVENANCE_FILE, size, identity=ident)]
    mine = [o for o in outputs if o.resource == resource]
    fmt = next((o.format for o in mine if o.format), None)
    content = next((o.content for o in mine if o.content), None)
    target = resolve_target(client, address, resource)
    stage_out(client, target, files, overwrite=True, fmt=fmt, content=content)
    _remove_others(client, target, {f.remote for f in files})
    return [
        {"resource": resource, "name": f.remote, "size": f.size, "md5": f.digest()} for f in files
    ]


def _remove_others(client: XnatClient, target: Target, keep: set[str]) -> None:
    """Delete the resource's files that are not ``keep``: an earlier attempt's outputs under
    other names (``T1a.nii.gz`` beside ``T1.nii.gz``) would otherwise pass for this one's."""
    for name in sorted(set(remote_files(client, target) or {}) - keep):
        if not SAFE_PATH.match(name):
            log.warning("%s: cannot address %r to delete it; left in place", target.label, name)
            continue
        log.info("%s: deleting %s, left by an earlier attempt", target.label, name)
        try:
            client.request(
                "DELETE", f"{target.files_url}/{name}", f"deleting {name} from {target.label}"
            )
        except XnatNotFoundError:
            pass  # deleted meanwhile: fine


def _named(files: list[LocalFile]) -> list[LocalFile]:
    """The files in upload order, refusing two that XNAT would store under one name."""
    by_name: dict[str, LocalFile] = {}
    for item in sorted(files, key=lambda f: f.path):
        if not SAFE_PATH.match(item.remote):
            raise StageError(
                f"{item.path}: the name {item.remote!r} has characters XNAT cannot address "
                "reliably",
                hint="rename it to letters, digits, '.', '_', '-' and '+'",
            )
        if item.remote in by_name:
            raise StageError(
                f"two files would both be uploaded as {item.remote!r}: "
                f"{by_name[item.remote].path} and {item.path}"
            )
        by_name[item.remote] = item
    return list(by_name.values())


def _matches(fd: int, out: Path, pattern: str) -> list[str]:
    """The paths below the open folder ``fd`` that ``pattern`` matches as ``Path.glob`` would
    (``*`` within a name, ``**`` any folders), found without following a link: a link or
    special file the pattern matches, or a link to a folder it would look into, is refused.
    Folders it matches are left out, as are provenance records of earlier attempts."""
    parts = [p for p in pattern.split("/") if p not in ("", ".")]
    found: list[str] = []
    _match_in(fd, out, "", parts, _closure(parts, {0}), found)
    return sorted(found)


def _closure(parts: list[str], states: set[int]) -> set[int]:
    """Pattern positions reachable without consuming a name: ``**`` may match no folder."""
    todo, seen = list(states), set(states)
    while todo:
        i = todo.pop()
        if i < len(parts) and parts[i] == "**" and i + 1 not in seen:
            seen.add(i + 1)
            todo.append(i + 1)
    return seen


def _match_in(
    fd: int, folder: Path, prefix: str, parts: list[str], states: set[int], found: list[str]
) -> None:
    for name in sorted(os.listdir(fd)):
        named: set[int] = set()  # a part of the pattern matches this name
        for i in states:
            if i < len(parts) and parts[i] != "**" and fnmatch.fnmatchcase(name, parts[i]):
                named.add(i + 1)
        named = _closure(parts, named)
        # ** takes this name too, and may take more; but, as in Path.glob, not through a link
        after = _closure(parts, named | {i for i in states if i < len(parts) and parts[i] == "**"})
        # A pattern ending in ** matches folders only (as Path.glob), and folders are no outputs.
        whole = len(parts) in named and parts[-1:] != ["**"]
        deeper = any(i < len(parts) for i in after)
        if not (whole or deeper) or name == PROVENANCE_FILE:
            continue
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        path = folder / name
        into = any(i < len(parts) for i in named)
        if stat.S_ISLNK(mode) and (whole or into and _leads_to_folder(fd, name)):
            raise link_refusal(path, read_link(name, fd), SCAN)
        if stat.S_ISLNK(mode):
            continue  # not matched, and not a folder the pattern would look into
        if stat.S_ISDIR(mode):
            if deeper:
                with subfolder(fd, name, path, SCAN) as sub:
                    _match_in(sub, path, f"{prefix}{name}/", parts, after, found)
            continue
        what = kind_of(mode)
        if what is not None:
            if whole:
                raise refusal(path, what, SCAN)
            continue
        if whole:
            found.append(f"{prefix}{name}")


def _refuse_links_and_specials(fd: int, folder: Path) -> None:
    """Refuse the scan if anything in its output folder is a link, FIFO, socket or device,
    whether or not a recipe's pattern matches it: such a thing in a job's outputs is either a
    tool linking its inputs (which XNAT has already) or an attempt to make us read elsewhere,
    and a scan's outputs are uploaded whole or not at all."""
    for name in sorted(os.listdir(fd)):
        try:
            mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        path = folder / name
        if stat.S_ISLNK(mode):
            raise link_refusal(path, read_link(name, fd), SCAN)
        if stat.S_ISDIR(mode):
            with subfolder(fd, name, path, SCAN) as sub:
                _refuse_links_and_specials(sub, path)
            continue
        what = kind_of(mode)
        if what is not None:
            raise refusal(path, what, SCAN)


def _leads_to_folder(fd: int, name: str) -> bool:
    """Whether a link points to a folder (stat follows it, but opens nothing)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=fd).st_mode)
    except OSError:
        return False


def _safe_output_names(fd: int) -> None:
    """Rename outputs whose names XNAT cannot address (dcm2niix copies protocol names such as
    ``ep2d bold (rest)`` into file names) to the same name with those characters as ``_``.
    Regular files only, in the open output folder: a link is not an output to tidy up."""
    for name in sorted(os.listdir(fd)):
        fixed = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        if SAFE_PATH.match(name) or not _is_file(fd, name) or _exists(fd, fixed):
            continue
        log.info("renaming output %s to %s for XNAT", name, fixed)
        os.rename(name, fixed, src_dir_fd=fd, dst_dir_fd=fd)


def _is_file(fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _exists(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_provenance(
    fd: int, record: dict[str, Any], resource: str, files: list[LocalFile]
) -> None:
    """A small JSON file uploaded beside the outputs: what made them, from what, and when.

    Written to a new name and renamed over ``PROVENANCE_FILE`` in the open output folder: a
    link the job left under that name is replaced, not written through."""
    tool_version = None
    for item in files:
        if item.path.suffix == ".json":
            with contextlib.suppress(OSError, ValueError, StageError), item.open() as fh:
                sidecar = json.loads(fh.read(SIDECAR_LIMIT))
                if isinstance(sidecar, dict):
                    tool_version = sidecar.get("ConversionSoftwareVersion") or tool_version
    record.update(
        converter_version=tool_version,
        resource=resource,
        files=sorted(f.path.name for f in files),
    )
    tmp = f".{PROVENANCE_FILE}.{os.getpid()}.part"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=fd)
        # O_EXCL: a new file, never an existing one nor a link's target
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666, dir_fd=fd)
        with os.fdopen(out, "w") as fh:
            fh.write(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, PROVENANCE_FILE, src_dir_fd=fd, dst_dir_fd=fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=fd)
        raise StageError(
            f"cannot write {PROVENANCE_FILE} in the output folder: {exc.strerror}"
        ) from None
