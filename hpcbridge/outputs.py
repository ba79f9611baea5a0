"""A job's outputs into XNAT, the way runs upload them.

Two places upload a run's outputs: the bridge itself (``hpcbridge run`` / ``sync``) and, in a job
chain, the stage-out job on the cluster (``hpcbridge stage-out --spec``). Both go through
:func:`upload_outputs`, so both rename outputs to names XNAT can address, sort them into the
recipe's output resources, and upload a provenance record beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import StageError
from .recipes import Output
from .stageout import SAFE_PATH, collect, resolve_target, stage_out
from .xnat.address import Address
from .xnat.client import XnatClient

__all__ = ["PROVENANCE_FILE", "upload_outputs"]

log = logging.getLogger(__name__)

PROVENANCE_FILE = "hpcbridge-provenance.json"


def upload_outputs(
    client: XnatClient,
    address: Address,
    out: Path,
    outputs: Sequence[Output],
    provenance: dict[str, Any],
) -> list[dict[str, Any]]:
    """Upload what the job wrote in ``out`` into the scan at ``address``; the files uploaded.

    ``provenance`` is the record of what made the outputs (recipe, parameters, job); the
    converter version, the resource and its files are added per resource. Existing files are
    replaced: a re-run replaces the outputs of an earlier attempt, the ledger decides what is done.
    """
    safe_output_names(out)
    by_resource: dict[str, list[Path]] = {}
    for output in outputs:
        # The provenance file of an interrupted earlier stage-out is not an output of the job.
        matches = sorted(
            p for p in out.glob(output.glob) if p.is_file() and p.name != PROVENANCE_FILE
        )
        by_resource.setdefault(output.resource, []).extend(matches)
    if not any(by_resource.values()):
        raise StageError(
            f"the job wrote no output matching {', '.join(o.glob for o in outputs)} in {out}"
        )
    uploaded: list[dict[str, Any]] = []
    for resource, paths in by_resource.items():
        if not paths:
            continue
        record = _write_provenance(out, dict(provenance), resource, paths)
        files = collect([*paths, record])
        fmt = next((o.format for o in outputs if o.resource == resource and o.format), None)
        content = next((o.content for o in outputs if o.resource == resource and o.content), None)
        target = resolve_target(client, address, resource)
        stage_out(client, target, files, overwrite=True, fmt=fmt, content=content)
        uploaded += [
            {"resource": resource, "name": f.remote, "size": f.size, "md5": f.digest()}
            for f in files
        ]
    return uploaded


def safe_output_names(out: Path) -> None:
    """Rename outputs whose names XNAT cannot address (dcm2niix copies protocol names such as
    ``ep2d bold (rest)`` into file names) to the same name with those characters as ``_``."""
    for path in sorted(out.iterdir()):
        if not path.is_file() or SAFE_PATH.match(path.name):
            continue
        fixed = path.with_name(re.sub(r"[^A-Za-z0-9._-]", "_", path.name))
        if not fixed.exists():
            log.info("renaming output %s to %s for XNAT", path.name, fixed.name)
            path.rename(fixed)


def _write_provenance(out: Path, record: dict[str, Any], resource: str, paths: list[Path]) -> Path:
    """A small JSON file uploaded beside the outputs: what made them, from what, and when."""
    tool_version = None
    for path in paths:
        if path.suffix == ".json" and path.name != PROVENANCE_FILE:
            with contextlib.suppress(OSError, ValueError):
                sidecar = json.loads(path.read_text())
                if isinstance(sidecar, dict):
                    tool_version = sidecar.get("ConversionSoftwareVersion") or tool_version
    record.update(
        converter_version=tool_version, resource=resource, files=sorted(p.name for p in paths)
    )
    target = out / PROVENANCE_FILE
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target
