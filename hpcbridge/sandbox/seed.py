"""Seed data for the sandbox: ``demo`` is the Artemis guide's project, with synthetic DICOM.

Project ``PTV000`` has three subjects (``Haofei01`` .. ``Haofei03``), one MR session each
(``Haofei01_MR1`` ...), and in every session:

- scan 1 ``Localizer`` (3 slices), scan 4 ``Ax 3D T1`` (12 slices, the guide's scan), scan 5
  ``ep2d bold (rest)`` (8 slices; its type needs sanitising in zip paths), all DICOM
  resources of real, dcm2niix-convertible series;
- scan 99 ``PhoenixZIPReport``, whose DICOM resource holds a text report and no DICOM at all,
  for the error paths of conversion.
"""

from __future__ import annotations

from functools import cache

from ..errors import SandboxError
from .dicomgen import SeriesSpec, make_uid, series_files
from .store import Store

SEEDS = ("demo",)
DEMO_PROJECT = "PTV000"
DEMO_SCANS = [
    SeriesSpec(1, "Localizer", n_slices=3),
    SeriesSpec(4, "Ax 3D T1", n_slices=12),
    SeriesSpec(5, "ep2d bold (rest)", n_slices=8, slice_thickness=3.0),
]
REPORT_SCAN = ("99", "PhoenixZIPReport")


def seed_archive(store: Store, name: str, *, user: str = "admin") -> bool:
    """Fill the archive with the named seed; False when it is already there (restarts)."""
    if name not in SEEDS:
        raise SandboxError(f"unknown seed {name!r}", hint=f"known seeds: {', '.join(SEEDS)}")
    if store.project(DEMO_PROJECT) is not None:
        return False
    store.create_project(
        DEMO_PROJECT,
        user,
        name="Artemis dcm2niix demo",
        secondary_id="PTV000",
        description="Synthetic MR sessions served by the hpcbridge sandbox",
    )
    for n in (1, 2, 3):
        subject = store.create_subject(DEMO_PROJECT, f"Haofei0{n}", user)
        label = f"Haofei0{n}_MR1"
        session = store.create_experiment(
            DEMO_PROJECT, subject["id"], label, "xnat:mrSessionData", user, date=f"2024-01-0{n + 1}"
        )
        study_uid = make_uid("sandbox-demo", label)
        for spec in DEMO_SCANS:
            scan = store.put_scan(
                session["id"],
                str(spec.series_number),
                "xnat:mrScanData",
                type=spec.series_description,
                series_description=spec.series_description,
                frames=str(spec.n_slices),
            )
            files = _demo_series(spec, subject["label"], study_uid, f"2024010{n + 1}")
            _add_resource(store, str(scan["pk"]), list(files))
        sid, kind = REPORT_SCAN
        scan = store.put_scan(
            session["id"],
            sid,
            "xnat:mrScanData",
            type=kind,
            series_description=kind,
            quality="unusable",
        )
        report = f"Phoenix protocol report for {label} (not an image)\n".encode()
        _add_resource(store, str(scan["pk"]), [("phoenix_report.txt", report)])
    return True


@cache
def _demo_series(
    spec: SeriesSpec, patient: str, study_uid: str, study_date: str
) -> tuple[tuple[str, bytes], ...]:
    """The seed's series, generated once per process: series_files is a pure function and
    writing the DICOM dominates the cost of every fresh seeded sandbox a test suite starts."""
    return tuple(
        series_files(
            spec,
            patient_id=patient,
            patient_name=patient,
            study_uid=study_uid,
            study_date=study_date,
            seed="demo",
        )
    )


def _add_resource(store: Store, scan_pk: str, files: list[tuple[str, bytes]]) -> None:
    res = store.create_resource("scan", scan_pk, "DICOM", format="DICOM", content="RAW")
    for name, data in files:
        store.add_file(res["id"], name, store.spool(iter([data])), overwrite=True)
