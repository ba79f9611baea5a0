"""DICOM header QC: ``python3 -m hpcbridge.qc INPUT OUTPUT`` (the ``dicom-qc`` built-in recipe).

Reads every file under INPUT with pydicom (headers only, ``stop_before_pixels``) and writes
OUTPUT/qc.json and a human-readable OUTPUT/qc.txt: per series its UID, modality, description,
manufacturer, instance count, missing and duplicate instance numbers and whether the slice
spacing is consistent; plus the files that are not DICOM. Findings are reported, not fatal: the
exit status is 0 whenever the report was written (2 for a usage error).
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pydicom

#: Slice gaps that differ by more than this (mm) from the median make the spacing inconsistent.
SPACING_TOLERANCE_MM = 0.01


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value) if value is not None else ""


def _slice_position(ds: pydicom.Dataset) -> float | None:
    """Distance of the slice along its normal (from ImagePositionPatient/OrientationPatient)."""
    try:
        position = [float(v) for v in ds.ImagePositionPatient]
        o = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(position) != 3 or len(o) != 6:
        return None
    normal = (
        o[1] * o[5] - o[2] * o[4],
        o[2] * o[3] - o[0] * o[5],
        o[0] * o[4] - o[1] * o[3],
    )
    return sum(p * n for p, n in zip(position, normal, strict=True))


def _spacing(positions: list[float]) -> dict[str, Any]:
    unique = sorted(set(round(p, 4) for p in positions))
    gaps = [b - a for a, b in pairwise(unique)]
    if not gaps:
        return {"spacing_mm": None, "min_mm": None, "max_mm": None, "consistent": None}
    median = sorted(gaps)[len(gaps) // 2]
    consistent = all(math.isclose(g, median, abs_tol=SPACING_TOLERANCE_MM) for g in gaps)
    return {
        "spacing_mm": round(median, 4),
        "min_mm": round(min(gaps), 4),
        "max_mm": round(max(gaps), 4),
        "consistent": consistent,
    }


def scan(folder: Path) -> dict[str, Any]:
    """The QC report for every file under ``folder`` (as written to qc.json)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = _Found()
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - one unreadable file must not stop the report
            found.non_dicom.append(rel)
            continue
        found.add(ds, rel)
    report_series = [found.judged(uid, entry) for uid, entry in found.series.items()]
    report_series.sort(key=lambda s: (_number_key(s["series_number"]), s["series_uid"]))
    return {
        "input": str(folder),
        "files": len(files),
        "dicom_files": len(files) - len(found.non_dicom),
        "series": report_series,
        "non_dicom_files": found.non_dicom,
        "ok": not any(s["problems"] for s in report_series) and not found.non_dicom,
    }


@dataclass
class _Found:
    """The series read so far, with each one's instance numbers and slice positions."""

    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    numbers: dict[str, list[int]] = field(default_factory=dict)
    positions: dict[str, list[float]] = field(default_factory=dict)
    non_dicom: list[str] = field(default_factory=list)

    def add(self, ds: pydicom.Dataset, rel: str) -> None:
        uid = _text(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)"
        entry = self.series.setdefault(
            uid,
            {
                "series_uid": uid,
                "series_number": _text(ds, "SeriesNumber"),
                "modality": _text(ds, "Modality"),
                "description": _text(ds, "SeriesDescription"),
                "manufacturer": _text(ds, "Manufacturer"),
                "slice_thickness_mm": _text(ds, "SliceThickness"),
                "instances": 0,
                "without_instance_number": 0,
                "files": [],
            },
        )
        entry["instances"] += 1
        entry["files"].append(rel)
        number = ds.get("InstanceNumber")
        try:
            self.numbers.setdefault(uid, []).append(int(number))
        except (TypeError, ValueError):
            entry["without_instance_number"] += 1
        position = _slice_position(ds)
        if position is not None:
            self.positions.setdefault(uid, []).append(position)

    def judged(self, uid: str, entry: dict[str, Any]) -> dict[str, Any]:
        """The series' entry with its gaps, duplicates, spacing and problems added."""
        seen = self.numbers.get(uid, [])
        entry["missing_instance_numbers"] = (
            sorted(set(range(1, max(seen) + 1)) - set(seen)) if seen else []
        )
        entry["duplicate_instance_numbers"] = sorted(n for n, c in Counter(seen).items() if c > 1)
        entry["slice_spacing"] = _spacing(self.positions.get(uid, []))
        found = [
            (entry["missing_instance_numbers"], "missing instance numbers"),
            (entry["duplicate_instance_numbers"], "duplicate instance numbers"),
            (entry["without_instance_number"], "instances without InstanceNumber"),
            (entry["slice_spacing"]["consistent"] is False, "inconsistent slice spacing"),
        ]
        entry["problems"] = [words for there, words in found if there]
        return entry


def _number_key(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return sys.maxsize


def _ranges(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``'1-3, 7'``."""
    parts: list[str] = []
    for value in values:
        if parts and value == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{value}"
        else:
            parts.append(str(value))
    return ", ".join(parts) or "none"


def to_text(report: dict[str, Any]) -> str:
    lines = [
        f"DICOM QC of {report['input']}",
        f"{report['files']} files: {report['dicom_files']} DICOM, "
        f"{len(report['non_dicom_files'])} not DICOM; {len(report['series'])} series",
        f"Overall: {'OK' if report['ok'] else 'PROBLEMS FOUND'}",
    ]
    for s in report["series"]:
        spacing = s["slice_spacing"]
        if spacing["consistent"] is None:
            spacing_text = "n/a (fewer than 2 slice positions)"
        elif spacing["consistent"]:
            spacing_text = f"{spacing['spacing_mm']} mm, consistent"
        else:
            spacing_text = (
                f"INCONSISTENT: {spacing['min_mm']} to {spacing['max_mm']} mm "
                f"(median {spacing['spacing_mm']} mm)"
            )
        lines += [
            "",
            f"Series {s['series_number'] or '?'}: {s['description'] or '(no description)'}",
            f"  UID:          {s['series_uid']}",
            f"  Modality:     {s['modality'] or '?'}",
            f"  Manufacturer: {s['manufacturer'] or '?'}",
            f"  Instances:    {s['instances']}",
            f"  Missing:      {_ranges(s['missing_instance_numbers'])}",
            f"  Duplicates:   {_ranges(s['duplicate_instance_numbers'])}",
            f"  Spacing:      {spacing_text}",
            f"  Problems:     {', '.join(s['problems']) or 'none'}",
        ]
    if report["non_dicom_files"]:
        lines += ["", "Not DICOM:"] + [f"  {name}" for name in report["non_dicom_files"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python3 -m hpcbridge.qc INPUT_DIR OUTPUT_DIR", file=sys.stderr)
        return 2
    source, target = Path(args[0]), Path(args[1])
    if not source.is_dir():
        print(f"hpcbridge.qc: input {source} is not a folder", file=sys.stderr)
        return 2
    report = scan(source)
    target.mkdir(parents=True, exist_ok=True)
    (target / "qc.json").write_text(json.dumps(report, indent=2) + "\n")
    (target / "qc.txt").write_text(to_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
