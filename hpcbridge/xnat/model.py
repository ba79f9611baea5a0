"""Typed views of XNAT listings: frozen dataclasses parsed at the edge from ResultSet rows.

Each keeps the row it came from in ``raw`` (XNAT's own keys, numbers already ints) so that
``--json`` output can show exactly what XNAT said; the rest of the code uses the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _int(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _texts(row: Mapping[str, Any], **keys: str) -> dict[str, Any]:
    """Fields from the row: each field's value under its key, "" where the row lacks it."""
    return {name: row.get(key, "") for name, key in keys.items()}


@dataclass(frozen=True)
class Project:
    id: str
    name: str = ""
    description: str = ""
    secondary_id: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Project:
        texts = _texts(row, name="name", description="description", secondary_id="secondary_ID")
        return cls(row["ID"], raw=dict(row), **texts)


@dataclass(frozen=True)
class Subject:
    id: str
    label: str
    project: str
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Subject:
        return cls(row["ID"], row.get("label", ""), row.get("project", ""), dict(row))


@dataclass(frozen=True)
class Experiment:
    id: str
    label: str
    project: str
    xsi_type: str = ""
    date: str = ""
    subject_id: str = ""
    subject_label: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Experiment:
        return cls(
            row["ID"],
            subject_id=row.get("subject_ID") or row.get("xnat:imagesessiondata/subject_id", ""),
            raw=dict(row),
            **_texts(row, label="label", project="project", xsi_type="xsiType", date="date"),
            **_texts(row, subject_label="subject_label"),
        )


@dataclass(frozen=True)
class Scan:
    id: str
    type: str = ""
    series_description: str = ""
    quality: str = ""
    xsi_type: str = ""
    experiment_id: str = ""
    file_count: int = 0
    file_size: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], experiment_id: str = "") -> Scan:
        return cls(
            str(row["ID"]),
            experiment_id=experiment_id,
            file_count=_int(row.get("file_count", 0)),
            file_size=_int(row.get("file_size", 0)),
            raw=dict(row),
            **_texts(row, type="type", quality="quality", xsi_type="xsiType"),
            **_texts(row, series_description="series_description"),
        )


@dataclass(frozen=True)
class ScanRef:
    """One scan of a project, as a run plans it: where it is and what it is."""

    project: str
    subject_label: str
    experiment_id: str
    experiment_label: str
    scan_id: str
    type: str = ""
    series_description: str = ""
    quality: str = ""

    @property
    def address(self) -> str:
        return f"{self.project}/{self.subject_label}/{self.experiment_label}/{self.scan_id}"

    def as_dict(self) -> dict[str, str]:
        return {
            "project": self.project,
            "subject_label": self.subject_label,
            "experiment_ID": self.experiment_id,
            "experiment_label": self.experiment_label,
            "scan_ID": self.scan_id,
            "type": self.type,
            "series_description": self.series_description,
            "quality": self.quality,
        }


@dataclass(frozen=True)
class FileEntry:
    name: str
    path: str  # relative to the resource root
    size: int
    digest: str
    uri: str
    resource_label: str = ""
    resource_id: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> FileEntry:
        uri = row.get("URI", "")
        path = uri.split("/files/", 1)[1] if "/files/" in uri else row.get("Name", "")
        return cls(
            row.get("Name", ""),
            path,
            _int(row.get("Size", 0)),
            row.get("digest", ""),
            uri,
            row.get("collection", ""),
            _int(row.get("cat_ID", 0)),
            dict(row),
        )


@dataclass(frozen=True)
class Resource:
    id: int
    label: str
    format: str = ""
    content: str = ""
    file_count: int = 0
    file_size: int = 0
    owner_id: str = ""  # cat_id: the scan ID for scan resources
    files: tuple[FileEntry, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], files: tuple[FileEntry, ...] = ()) -> Resource:
        return cls(
            _int(row.get("xnat_abstractresource_id", 0)),
            file_count=_int(row.get("file_count", 0)),
            file_size=_int(row.get("file_size", 0)),
            owner_id=str(row.get("cat_id", "")),
            files=files,
            raw=dict(row),
            **_texts(row, label="label", format="format", content="content"),
        )
