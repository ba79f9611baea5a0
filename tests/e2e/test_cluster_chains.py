"""Job chains on the CI cluster: `run --chain` through SSH submits, per scan, a stage-in job,
the dcm2niix job and a stage-out job with afterok dependencies, to qsub (Slurm's PBS wrappers)
or sbatch; the transfer jobs run `hpcbridge stage-in/stage-out` on the cluster's side with the
run's token from a private file. The fixtures (`kind`, `run_profile`) are tests/e2e/conftest.py's.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from hpcbridge.cli import main

pytestmark = pytest.mark.e2e

SUBJECTS = ("Haofei01", "Haofei02", "Haofei03")
# distinctive, so a search of every file on the cluster's side finds only real leaks
PASSWORD = "Chain-e2e-Pa55word"


@pytest.fixture()
def sandbox(make_sandbox: Any) -> Any:
    """This module's sandbox (used by run_profile) has an admin password worth searching for."""
    return make_sandbox(admin_password=PASSWORD)


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture()
def chain_profile(run_profile: Path, isolated_home: Path, chain_settings: str) -> Path:
    """The run profile, with the transfer jobs running this checkout's hpcbridge on a queue
    whose nodes may reach XNAT."""
    config = isolated_home / "config.toml"
    config.write_text(config.read_text() + chain_settings)
    return run_profile


def test_run_chain_converts_every_t1_with_transfers_on_the_cluster(
    kind: str, chain_profile: Path, sandbox: Any, scheduler_queue: Any
) -> None:
    result = cli(
        "run", "dcm2niix", "PTV000", "--scan-type", "*T1*", "--chain", "--wait",
        "--interval", "0.3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.count("(stage-in -> compute -> stage-out)") == 3
    run_id = result.stdout.strip()
    status = json.loads(cli("--json", "status", run_id).stdout)
    assert [j["state"] for j in status["jobs"]] == ["uploaded"] * 3

    for subject in SUBJECTS:
        scan = f"PTV000/{subject}/{subject}_MR1/4"
        job = next(j for j in status["jobs"] if j["scan"] == scan)
        assert sorted(u["name"] for u in job["uploaded"]) == [
            "Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz", "hpcbridge-provenance.json"
        ]  # fmt: skip
        listing = requests.get(
            f"{sandbox.url}/data/projects/PTV000/subjects/{subject}/experiments/"
            f"{subject}_MR1/scans/4/resources/NIFTI/files",
            params={"format": "json"},
            auth=(sandbox.user, sandbox.password),
            timeout=30,
        ).json()["ResultSet"]["Result"]
        assert sorted(f["Name"] for f in listing) == sorted(u["name"] for u in job["uploaded"])
        # the stage-in and stage-out ran as jobs in the work_root, on the cluster's side
        folder = next(chain_profile.glob(f"run-*/{subject}_MR1/scans/4-*"))
        assert (folder / "resources" / "DICOM" / "manifest.json").is_file()
        assert (folder / "chain" / "stage-in" / ".hpcbridge" / "status.json").is_file()
        report = json.loads((folder / "chain" / "stage-out" / "uploaded.json").read_text())
        assert report["uploaded"] == job["uploaded"]

    # Three jobs per scan went to the scheduler, once each.
    run_prefix = status["jobs"][0]["name"].split("_", 1)[0]  # hb<run>-<tag>
    assert run_prefix.startswith(f"hb{run_id}-")
    names = sorted(j.name for j in scheduler_queue.all() if j.name.startswith(run_prefix + "_"))
    assert len(names) == 9, names
    assert sum(n.endswith("_in") for n in names) == 3
    assert sum(n.endswith("_out") for n in names) == 3

    # The token folder is private and the token is gone once the run is done; the password
    # was never written on the cluster's side.
    home = next(chain_profile.glob("run-*/.hpcbridge-chain"))
    # (a setgid bit inherited from a group folder above it gives the group nothing)
    assert stat.S_IMODE(home.stat().st_mode) & 0o777 == 0o700
    assert not (home / "credentials.json").exists()
    for path in chain_profile.rglob("*"):
        if path.is_file() and path.suffix not in (".dcm", ".gz"):
            assert PASSWORD not in path.read_text(errors="replace"), path
