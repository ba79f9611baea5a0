"""hpcbridge.qc, the dicom-qc built-in: a header report a lab reads before converting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpcbridge.qc import main
from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files

STUDY = make_uid("qc-study")


def _write(folder: Path, spec: SeriesSpec, **kw: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in series_files(
        spec, patient_id="QC1", patient_name="Qc^One", study_uid=STUDY, **kw
    ):
        (folder / name).write_bytes(data)
        out.append(folder / name)
    return out


def test_clean_series_report(tmp_path: Path) -> None:
    _write(tmp_path / "in" / "t1", SeriesSpec(4, "Ax 3D T1", n_slices=6, slice_thickness=1.5))
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "qc.json").read_text())
    assert report["ok"] is True
    assert report["non_dicom_files"] == []
    [series] = report["series"]
    assert series["series_uid"].startswith("2.25.")
    assert (series["modality"], series["description"], series["instances"]) == ("MR", "Ax 3D T1", 6)
    assert series["missing_instance_numbers"] == []
    assert series["duplicate_instance_numbers"] == []
    assert series["slice_spacing"]["spacing_mm"] == 1.5
    assert series["slice_spacing"]["consistent"] is True
    text = (tmp_path / "out" / "qc.txt").read_text()
    assert "Overall: OK" in text
    assert "Series 4: Ax 3D T1" in text
    assert "  Instances:    6" in text


def test_missing_duplicate_and_non_dicom(tmp_path: Path) -> None:
    files = _write(tmp_path / "in", SeriesSpec(2, "Sag T2", n_slices=8))
    files[2].unlink()  # instance 3 missing, so the gap 2 -> 4 is twice the others
    files[4].unlink()
    (tmp_path / "in" / "copy.dcm").write_bytes(files[5].read_bytes())  # instance 6 twice
    (tmp_path / "in" / "notes.txt").write_text("scanner notes\n")
    _write(tmp_path / "in" / "other", SeriesSpec(5, "Loc", n_slices=1))
    assert main([str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "qc.json").read_text())
    assert report["ok"] is False
    assert report["non_dicom_files"] == ["notes.txt"]
    assert report["files"] == 9 and report["dicom_files"] == 8
    t2, loc = report["series"]
    assert t2["description"] == "Sag T2" and t2["instances"] == 7
    assert t2["missing_instance_numbers"] == [3, 5]
    assert t2["duplicate_instance_numbers"] == [6]
    assert t2["slice_spacing"]["consistent"] is False
    assert t2["problems"] == [
        "missing instance numbers",
        "duplicate instance numbers",
        "inconsistent slice spacing",
    ]
    assert loc["instances"] == 1 and loc["slice_spacing"]["consistent"] is None
    text = (tmp_path / "out" / "qc.txt").read_text()
    assert "Overall: PROBLEMS FOUND" in text
    assert "  Missing:      3, 5" in text
    assert "  Duplicates:   6" in text
    assert "Not DICOM:\n  notes.txt" in text


def test_command_line_as_the_recipe_runs_it(tmp_path: Path) -> None:
    _write(tmp_path / "in", SeriesSpec(1, "T1", n_slices=2))
    done = subprocess.run(
        [sys.executable, "-m", "hpcbridge.qc", str(tmp_path / "in"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "qc.json").read_text())["series"][0]["instances"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "hpcbridge.qc", str(tmp_path / "nope"), str(tmp_path / "o2")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr == f"hpcbridge.qc: input {tmp_path / 'nope'} is not a folder\n"
