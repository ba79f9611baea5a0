"""Tests for hpcbridge.sandbox.dicomgen: tags, geometry, pixels, determinism, dcm2niix."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
from array import array
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from hpcbridge.sandbox.dicomgen import SeriesSpec, make_uid, series_files

STUDY_UID = make_uid("test-study")
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _generate(spec: SeriesSpec, **overrides: str) -> list[tuple[str, bytes]]:
    kwargs = {
        "patient_id": "SBX001",
        "patient_name": "Sandbox^Alice",
        "study_uid": STUDY_UID,
        "study_date": "20240102",
    }
    kwargs.update(overrides)
    return series_files(spec, **kwargs)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _pixels(ds: pydicom.Dataset) -> array:
    values = array("H", ds.PixelData)
    if array("H", [1]).tobytes() != b"\x01\x00":  # big-endian host
        values.byteswap()
    return values


def _assert_valid_uid(uid: str) -> None:
    assert len(uid) <= 64, uid
    assert UID_RE.match(uid), uid
    for component in uid.split("."):
        assert component == "0" or not component.startswith("0"), uid


@pytest.fixture(scope="module")
def spec() -> SeriesSpec:
    return SeriesSpec(series_number=4, series_description="Ax 3D T1")


@pytest.fixture(scope="module")
def files(spec: SeriesSpec) -> list[tuple[str, bytes]]:
    return _generate(spec)


@pytest.fixture(scope="module")
def datasets(files: list[tuple[str, bytes]]) -> list[pydicom.Dataset]:
    return [_read(data) for _, data in files]


def test_one_file_per_slice_with_zero_padded_names(
    spec: SeriesSpec, files: list[tuple[str, bytes]]
) -> None:
    assert [name for name, _ in files] == [f"{i:04d}.dcm" for i in range(1, spec.n_slices + 1)]


def test_part10_file_meta(files: list[tuple[str, bytes]], datasets: list[pydicom.Dataset]) -> None:
    for (_, data), ds in zip(files, datasets, strict=True):
        assert data[:128] == b"\0" * 128
        assert data[128:132] == b"DICM"
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == MRImageStorage


def test_identity_and_series_tags(spec: SeriesSpec, datasets: list[pydicom.Dataset]) -> None:
    for number, ds in enumerate(datasets, start=1):
        assert ds.StudyInstanceUID == STUDY_UID
        assert ds.PatientName == "Sandbox^Alice"
        assert ds.PatientID == "SBX001"
        assert ds.StudyDate == "20240102"
        assert ds.SeriesDate == "20240102"
        assert ds.StudyTime and ds.SeriesTime
        assert ds.Modality == "MR"
        assert ds.Manufacturer == "hpcbridge-sandbox"
        assert ds.SeriesNumber == 4
        assert ds.SeriesDescription == "Ax 3D T1"
        assert ds.ProtocolName == "Ax 3D T1"
        assert ds.InstanceNumber == number
        assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            _assert_valid_uid(uid)


def test_uids_unique_per_slice_and_shared_per_series(datasets: list[pydicom.Dataset]) -> None:
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert datasets[0].SeriesInstanceUID not in sop_uids
    assert datasets[0].SeriesInstanceUID != STUDY_UID


def test_image_pixel_module(spec: SeriesSpec, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        assert ds.Rows == spec.rows
        assert ds.Columns == spec.cols
        assert ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PixelRepresentation == 0
        assert len(ds.PixelData) == spec.rows * spec.cols * 2


def test_mr_acquisition_tags(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        assert float(ds.RepetitionTime) > 0
        assert float(ds.EchoTime) > 0
        assert float(ds.MagneticFieldStrength) > 0
        assert float(ds.FlipAngle) > 0
        assert ds.ScanningSequence
        assert ds.SequenceVariant
        assert ds.MRAcquisitionType == "3D"


@pytest.mark.parametrize(
    ("thickness", "spacing", "rows", "cols", "n_slices"),
    [(2.0, 2.0, 32, 32, 12), (1.1, 0.9375, 20, 28, 7), (3.3, 1.7, 16, 16, 1)],
)
def test_geometry_is_consistent(
    thickness: float, spacing: float, rows: int, cols: int, n_slices: int
) -> None:
    spec = SeriesSpec(
        series_number=7,
        series_description="geom",
        n_slices=n_slices,
        rows=rows,
        cols=cols,
        slice_thickness=thickness,
        pixel_spacing=spacing,
    )
    datasets = [_read(data) for _, data in _generate(spec)]
    first = datasets[0]
    for k, ds in enumerate(datasets):
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([spacing, spacing])
        assert float(ds.SliceThickness) == pytest.approx(thickness)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(thickness)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        # The normal of orientation [1,0,0,0,1,0] is +z: only z moves, by k * thickness.
        assert (x, y) == pytest.approx([float(v) for v in first.ImagePositionPatient[:2]])
        assert z == pytest.approx(float(first.ImagePositionPatient[2]) + k * thickness, abs=1e-5)
        assert float(ds.SliceLocation) == pytest.approx(z, abs=1e-5)
        assert len(ds.PixelData) == rows * cols * 2


def test_pixels_are_a_non_blank_phantom(spec: SeriesSpec, datasets: list[pydicom.Dataset]) -> None:
    slices = [_pixels(ds) for ds in datasets]
    for values in slices:
        assert len(values) == spec.rows * spec.cols
        assert len(set(values)) > 1
        assert max(values) <= (1 << 12) - 1
    # The ellipsoid's cross-section changes along the stack.
    assert slices[0] != slices[len(slices) // 2]


def test_output_is_deterministic(spec: SeriesSpec, files: list[tuple[str, bytes]]) -> None:
    assert _generate(spec) == files
    assert _generate(spec, seed="other") != files


def test_different_series_numbers_give_different_series_uids() -> None:
    uids = {
        _read(
            _generate(SeriesSpec(series_number=n, series_description="s", n_slices=1))[0][1]
        ).SeriesInstanceUID
        for n in (1, 2, 3, 4)
    }
    assert len(uids) == 4


def test_other_patient_or_study_gives_other_uids(files: list[tuple[str, bytes]]) -> None:
    spec = SeriesSpec(series_number=4, series_description="Ax 3D T1")
    base = _read(files[0][1])
    for overrides in ({"patient_id": "SBX002"}, {"study_uid": make_uid("another-study")}):
        ds = _read(_generate(spec, **overrides)[0][1])
        assert ds.SeriesInstanceUID != base.SeriesInstanceUID
        assert ds.SOPInstanceUID != base.SOPInstanceUID


def test_make_uid_is_valid_and_deterministic() -> None:
    samples = [make_uid(), make_uid(""), make_uid("a"), make_uid("a", "b"), make_uid("x" * 500)]
    samples += [make_uid("series", str(i)) for i in range(200)]
    for uid in samples:
        _assert_valid_uid(uid)
    assert make_uid("a", "b") == make_uid("a", "b")
    assert len(set(samples)) == len(samples)
    # Part boundaries matter.
    assert make_uid("ab", "c") != make_uid("a", "bc")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_slices": 0},
        {"rows": 0},
        {"cols": 70000},
        {"slice_thickness": 0.0},
        {"pixel_spacing": -1.0},
        {"series_number": -1},
    ],
)
def test_series_spec_rejects_bad_values(kwargs: dict[str, float]) -> None:
    params: dict = {"series_number": 1, "series_description": "bad"}
    params.update(kwargs)
    with pytest.raises(ValueError):
        SeriesSpec(**params)


def test_bad_study_date_is_rejected(spec: SeriesSpec) -> None:
    with pytest.raises(ValueError):
        _generate(spec, study_date="2024-01-02")


def test_dcm2niix_converts_series(tmp_path: Path) -> None:
    exe = shutil.which("dcm2niix")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("dcm2niix not installed (required when CI=true)")
        pytest.skip("dcm2niix not installed")

    spec = SeriesSpec(
        series_number=4,
        series_description="Ax 3D T1",
        n_slices=10,
        rows=24,
        cols=32,
        slice_thickness=1.5,
        pixel_spacing=0.9,
    )
    src = tmp_path / "in"
    out = tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name, data in _generate(spec):
        (src / name).write_bytes(data)

    proc = subprocess.run(
        [exe, "-z", "n", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    niftis = list(out.glob("*.nii"))
    assert len(niftis) == 1, (proc.stdout, sorted(p.name for p in out.iterdir()))

    data = niftis[0].read_bytes()
    n_voxels = spec.rows * spec.cols * spec.n_slices
    assert len(data) >= 348 + n_voxels * 2

    (sizeof_hdr,) = struct.unpack_from("<i", data, 0)
    assert sizeof_hdr == 348
    dims = struct.unpack_from("<8h", data, 40)
    assert dims[0] == 3
    assert dims[1:4] == (spec.cols, spec.rows, spec.n_slices)
    datatype, bitpix = struct.unpack_from("<hh", data, 70)
    assert (datatype, bitpix) in {(4, 16), (512, 16)}  # int16 or uint16
    pixdim = struct.unpack_from("<8f", data, 76)
    assert pixdim[1:4] == pytest.approx(
        [spec.pixel_spacing, spec.pixel_spacing, spec.slice_thickness]
    )
    (vox_offset,) = struct.unpack_from("<f", data, 108)
    assert len(data) == int(vox_offset) + n_voxels * 2
