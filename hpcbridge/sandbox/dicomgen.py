"""Deterministic synthetic MR DICOM series for the sandbox XNAT server.

The fake XNAT server serves these files to tests and demos, and the pipelines it feeds
run the real ``dcm2niix`` on them, so every series is a geometrically consistent axial
volume: slices share one orientation, their positions advance along the slice normal
by exactly ``slice_thickness``, and the spacing tags agree with the positions.

Everything is a pure function of the arguments. UIDs are hashes of the identifying
arguments, dates and times are fixed, and no clock or random source is read, so the
same call always returns byte-identical files (handy for checksums and caching tests).

Files are named ``0001.dcm``, ``0002.dcm``, ... (1-based, zero-padded to at least four
digits so a plain lexical sort is slice order); the number equals ``InstanceNumber``.

Only the standard library and pydicom are used: numpy is deliberately not a
dependency, the pixel data is packed with :mod:`array`.
"""

from __future__ import annotations

import hashlib
import io
import sys
from array import array
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

__all__ = ["SeriesSpec", "make_uid", "series_files"]

MANUFACTURER = "hpcbridge-sandbox"

# Our own implementation UID/version keep the file meta (and so the bytes) independent of
# which pydicom release wrote them; pydicom would otherwise stamp its own.
_IMPLEMENTATION_VERSION_NAME = "HPCBRIDGE_SBX1"

_PYDICOM_MAJOR = int(pydicom.__version__.split(".")[0])

# 12-bit data in 16-bit words, as most MR scanners write it.
_BITS_STORED = 12
_MAX_PIXEL = (1 << _BITS_STORED) - 1

_STUDY_TIME = "093000"

# Tags every slice of every series shares. The MR acquisition parameters describe a generic 3 T
# spoiled-gradient-echo 3D T1 protocol; dcm2niix copies them into the BIDS sidecar and uses
# several of them for its heuristics.
_FIXED_TAGS: dict[str, Any] = {
    "SpecificCharacterSet": "ISO_IR 100",
    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
    "SOPClassUID": MRImageStorage,
    "StudyTime": _STUDY_TIME,
    "AccessionNumber": "",
    "Manufacturer": MANUFACTURER,
    "InstitutionName": "hpcbridge sandbox",
    "ReferringPhysicianName": "",
    "StudyDescription": "hpcbridge sandbox study",
    "ManufacturerModelName": "dicomgen",
    "PatientBirthDate": "",
    "PatientSex": "O",
    "ScanningSequence": "GR",
    "SequenceVariant": ["SP", "MP"],
    "ScanOptions": "",
    "MRAcquisitionType": "3D",
    "SequenceName": "*fl3d1",
    "RepetitionTime": "8.2",
    "EchoTime": "3.2",
    "InversionTime": "450",
    "NumberOfAverages": "1",
    "ImagingFrequency": "127.7",
    "ImagedNucleus": "1H",
    "EchoNumbers": "1",
    "MagneticFieldStrength": "3",
    "EchoTrainLength": "1",
    "PercentSampling": "100",
    "PercentPhaseFieldOfView": "100",
    "PixelBandwidth": "240",
    "InPlanePhaseEncodingDirection": "COL",
    "FlipAngle": "12",
    "PatientPosition": "HFS",
    "StudyID": "1",
    "AcquisitionNumber": 1,
    "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
    "PositionReferenceIndicator": "",
    "SamplesPerPixel": 1,
    "PhotometricInterpretation": "MONOCHROME2",
    "BitsAllocated": 16,
    "BitsStored": _BITS_STORED,
    "HighBit": _BITS_STORED - 1,
    "PixelRepresentation": 0,
    "WindowCenter": "800",
    "WindowWidth": "1600",
}


@dataclass(frozen=True)
class SeriesSpec:
    """Shape and labels of one synthetic series (an axial stack of ``n_slices`` images)."""

    series_number: int
    series_description: str
    n_slices: int = 12
    rows: int = 32
    cols: int = 32
    modality: str = "MR"
    slice_thickness: float = 2.0  # mm
    pixel_spacing: float = 2.0  # mm (square pixels)

    def __post_init__(self) -> None:
        # Fail here rather than deep inside pydicom with a less helpful message.
        if self.series_number < 0:
            raise ValueError(f"series_number must be >= 0, got {self.series_number}")
        if self.n_slices < 1:
            raise ValueError(f"n_slices must be >= 1, got {self.n_slices}")
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if not 1 <= value <= 0xFFFF:  # Rows/Columns are US
                raise ValueError(f"{name} must be in 1..65535, got {value}")
        if not self.slice_thickness > 0:
            raise ValueError(f"slice_thickness must be > 0, got {self.slice_thickness}")
        if not self.pixel_spacing > 0:
            raise ValueError(f"pixel_spacing must be > 0, got {self.pixel_spacing}")


def make_uid(*parts: str) -> str:
    """Return a deterministic DICOM UID derived from ``parts``.

    Uses the ``2.25.<decimal 128-bit integer>`` form (ISO/IEC 9834-8, as
    ``pydicom.uid.generate_uid(prefix=None)`` does), so the result is at most 44 characters,
    digits and dots only, and a decimal integer never has a leading zero.
    """
    hasher = hashlib.sha256()
    for part in parts:
        # Length-prefixing keeps ("ab", "c") and ("a", "bc") apart.
        encoded = str(part).encode("utf-8")
        hasher.update(f"{len(encoded)}:".encode("ascii"))
        hasher.update(encoded)
    return "2.25." + str(int.from_bytes(hasher.digest()[:16], "big"))


def series_files(
    spec: SeriesSpec,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    study_date: str = "20240102",
    seed: str = "",
) -> list[tuple[str, bytes]]:
    """Return ``[(filename, dicom_bytes)]`` for one series, one Part 10 file per slice.

    Filenames are ``0001.dcm`` .. ``NNNN.dcm`` in slice (and ``InstanceNumber``) order.
    The output is byte-identical for identical arguments; ``seed`` lets callers get a
    different set of series/instance UIDs for otherwise identical data.
    """
    if len(study_date) != 8 or not study_date.isdigit():
        raise ValueError(f"study_date must be YYYYMMDD, got {study_date!r}")

    series_uid = make_uid("series", seed, patient_id, study_uid, str(spec.series_number))
    # One frame of reference per study: series of one session share the scanner's
    # patient coordinate system, which is what lets viewers link them.
    frame_uid = make_uid("frame-of-reference", seed, patient_id, study_uid)
    series_time = _series_time(spec.series_number)

    width = max(4, len(str(spec.n_slices)))
    files: list[tuple[str, bytes]] = []
    for index in range(spec.n_slices):
        instance_number = index + 1
        sop_uid = make_uid(
            "instance", seed, patient_id, study_uid, str(spec.series_number), str(instance_number)
        )
        ds = _slice_dataset(
            spec,
            index=index,
            sop_uid=sop_uid,
            series_uid=series_uid,
            frame_uid=frame_uid,
            study_uid=study_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            study_date=study_date,
            series_time=series_time,
        )
        files.append((f"{instance_number:0{width}d}.dcm", _encode(ds)))
    return files


def _series_time(series_number: int) -> str:
    """A plausible acquisition time: series start a few minutes apart after the study."""
    minutes = (9 * 60 + 30 + 5 * series_number) % (24 * 60)
    return f"{minutes // 60:02d}{minutes % 60:02d}00"


def _ds(value: float) -> str:
    """Format a Decimal String: DS is limited to 16 characters, so avoid float repr noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _slice_dataset(
    spec: SeriesSpec,
    *,
    index: int,
    sop_uid: str,
    series_uid: str,
    frame_uid: str,
    study_uid: str,
    patient_id: str,
    patient_name: str,
    study_date: str,
    series_time: str,
) -> FileDataset:
    ds = FileDataset("", Dataset(), file_meta=_file_meta(sop_uid), preamble=b"\0" * 128)
    if _PYDICOM_MAJOR < 3:
        # pydicom 2.x needs the encoding on the dataset; 3.x derives it from the file meta
        # and deprecates these attributes.
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    _set(ds, _FIXED_TAGS)
    dates = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
    _set(ds, dict.fromkeys(dates, study_date))
    _set(ds, dict.fromkeys(("SeriesTime", "AcquisitionTime", "ContentTime"), series_time))
    _set(
        ds,
        {
            "SOPInstanceUID": sop_uid,
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "FrameOfReferenceUID": frame_uid,
            "PatientName": patient_name,
            "PatientID": patient_id,
            "Modality": spec.modality,
            "SeriesDescription": spec.series_description,
            "ProtocolName": spec.series_description,
            "SeriesNumber": spec.series_number,
            "InstanceNumber": index + 1,
        },
    )
    _set(ds, _geometry(spec, index))
    ds.PixelData = _phantom_slice(spec, index)
    ds["PixelData"].VR = "OW"
    return ds


def _set(ds: Dataset, tags: dict[str, Any]) -> None:
    for keyword, value in tags.items():
        setattr(ds, keyword, value)


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(make_uid("hpcbridge", "sandbox", "dicomgen"))
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME
    return meta


def _geometry(spec: SeriesSpec, index: int) -> dict[str, Any]:
    """Size, spacing and position of slice ``index``, centred on the isocentre. With orientation
    rows=+x, cols=+y the slice normal is +z, so slice k sits k * slice_thickness above slice 0."""
    x0 = -(spec.cols - 1) / 2 * spec.pixel_spacing
    y0 = -(spec.rows - 1) / 2 * spec.pixel_spacing
    z = (index - (spec.n_slices - 1) / 2) * spec.slice_thickness
    return {
        "Rows": spec.rows,
        "Columns": spec.cols,
        "AcquisitionMatrix": [spec.cols, 0, 0, spec.rows],
        "PixelSpacing": [_ds(spec.pixel_spacing), _ds(spec.pixel_spacing)],
        "SliceThickness": _ds(spec.slice_thickness),
        "SpacingBetweenSlices": _ds(spec.slice_thickness),
        "ImagePositionPatient": [_ds(x0), _ds(y0), _ds(z)],
        "SliceLocation": _ds(z),
    }


def _phantom_slice(spec: SeriesSpec, index: int) -> bytes:
    """Little-endian uint16 pixels of one slice through a head-like ellipsoid phantom.

    A bright shell ("scalp/skull") around a mid-grey "brain" with a dark central
    "ventricle" ellipsoid, on a faint deterministic noise floor. The cross-section shrinks
    towards the ends of the stack, so every slice differs and none is blank.
    """
    # Normalised coordinates in [-1, 1] across the field of view.
    w = 0.0 if spec.n_slices == 1 else (2 * index / (spec.n_slices - 1) - 1) * 0.9
    half_rows = spec.rows / 2
    half_cols = spec.cols / 2
    pixels = array("H")
    for r in range(spec.rows):
        v = (r + 0.5 - half_rows) / half_rows
        for c in range(spec.cols):
            u = (c + 0.5 - half_cols) / half_cols
            outer = (u / 0.8) ** 2 + (v / 0.9) ** 2 + (w / 0.95) ** 2
            if outer > 1.0:
                value = (r * 7 + c * 13 + index * 31) % 23
            elif outer > 0.72:
                value = 1500
            elif (u / 0.2) ** 2 + (v / 0.35) ** 2 + (w / 0.45) ** 2 <= 1.0:
                value = 250
            else:
                # A gentle anterior-posterior gradient, like coil shading.
                value = int(700 + 200 * v)
            pixels.append(min(value, _MAX_PIXEL))
    if sys.byteorder == "big":
        pixels.byteswap()
    return pixels.tobytes()


def _encode(ds: FileDataset) -> bytes:
    buffer = io.BytesIO()
    if _PYDICOM_MAJOR >= 3:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # pragma: no cover - exercised only with pydicom 2.x installed
        ds.save_as(buffer, write_like_original=False)
    return buffer.getvalue()
