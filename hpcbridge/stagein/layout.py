"""Stage-in's vocabulary: what to stage, the limits, the outcome, and where things go on disk.

Layout under ``dest`` (XNAT's own zip layout, as the Artemis guide uses)::

    <experiment>/scans/<scan>-<type>/resources/<resource>/files/...
    <experiment>/scans/<scan>-<type>/resources/<resource>/manifest.json
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HpcBridgeError
from ..xnat.model import Scan

CHUNK = 1024 * 1024
MANIFEST = "manifest.json"
STAGING = ".hpcbridge-staging"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Limits:
    """Guards against zip bombs and bad archives (configurable per call)."""

    max_total_bytes: int = 64 * 1024**3  # everything one scan may unpack to
    max_ratio: float = 200.0  # uncompressed / compressed, per entry
    min_free_bytes: int = 64 * 1024**2  # left free on the destination after the download


@dataclass(frozen=True)
class Selection:
    """Which scans of an experiment: IDs, type globs, series-description globs (any matches)."""

    ids: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    series: tuple[str, ...] = ()

    def matches(self, scan: Scan) -> bool:
        if not (self.ids or self.types or self.series):
            return True
        return (
            scan.id in self.ids
            or any(fnmatch.fnmatchcase(scan.type, g) for g in self.types)
            or any(fnmatch.fnmatchcase(scan.series_description, g) for g in self.series)
        )


@dataclass(frozen=True)
class StagedScan:
    """The outcome for one scan: where it is, and whether it was downloaded now."""

    scan: Scan
    folder: Path  # .../resources/<resource>
    skipped: bool
    files: int
    bytes: int
    dicom: dict[str, Any] = field(default_factory=dict)

    @property
    def files_dir(self) -> Path:
        return self.folder / "files"


@dataclass
class StageInReport:
    staged: list[StagedScan] = field(default_factory=list)
    failed: list[tuple[Scan, HpcBridgeError]] = field(default_factory=list)


def safe_name(text: str) -> str:
    """A label as a local path component: ``[A-Za-z0-9._-]`` only, never '.' or '..'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"
    return "_" + name if name in (".", "..") else name


def xnat_scan_folder(scan: Scan) -> str:
    """``<scan>-<type>`` exactly as XNAT names it in zips (type's ``\\W`` to ``_``)."""
    kind = re.sub(r"\W", "_", scan.type, flags=re.ASCII)
    return f"{scan.id}-{kind}" if scan.type else scan.id


def scan_folder(scan: Scan) -> str:
    """XNAT's scan folder name, made safe as a local path component."""
    return safe_name(xnat_scan_folder(scan))


def resource_folder(dest: Path, experiment_label: str, scan: Scan, resource: str) -> Path:
    scan_dir = Path(dest) / safe_name(experiment_label) / "scans" / scan_folder(scan)
    return scan_dir / "resources" / safe_name(resource)
