"""Helpers shared by the run scenarios of tests/integration (the local scheduler) and tests/e2e
(the CI clusters): the command line in-process and as a subprocess, the ledger's and the job
records' views of a run, and the test's own view of the sandbox XNAT.

Timeouts default to the local scheduler's; the cluster's tests pass their longer ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.jobs import JobStore
from hpcbridge.ledger import Ledger, ledger_path
from hpcbridge.sandbox import SandboxServer

REPO = Path(__file__).resolve().parents[1]
T = 10  # seconds for one HTTP request of the test itself
WAIT_LIMIT = 60  # seconds a waiting command may take before the test fails
SUBJECTS = ("Haofei01", "Haofei02", "Haofei03")
T1_SCANS = [f"PTV000/{s}/{s}_MR1/4" for s in SUBJECTS]
RUN_T1 = ["run", "dcm2niix", "PTV000", "--scan-type", "*T1*"]
# uploaded beside the outputs (docs/runs.md, "What lands in XNAT")
PROVENANCE_FILE = "hpcbridge-provenance.json"
# dcm2niix names the outputs after the protocol and series (-f %p_%s).
T1_OUTPUTS = ["Ax_3D_T1_4.json", "Ax_3D_T1_4.nii.gz", PROVENANCE_FILE]


def cli(*args: str) -> Result:
    """A quick command, in-process."""
    return CliRunner().invoke(main, list(args))


def bridge_env() -> dict[str, str]:
    """This test's environment (HPCBRIDGE_HOME, the sandbox XNAT), importing this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def hb(*args: str, timeout: float = WAIT_LIMIT) -> Done:
    """A command that may wait, as a subprocess that cannot outlive ``timeout``."""
    proc = subprocess.run(
        [sys.executable, "-m", "hpcbridge", *args],
        capture_output=True, text=True, timeout=timeout, env=bridge_env(),
    )  # fmt: skip
    return Done(proc.returncode, proc.stdout, proc.stderr)


def status_json(run_id: int | None = None) -> dict[str, Any]:
    result = cli("--json", "status", *([str(run_id)] if run_id is not None else []))
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def states(data: dict[str, Any]) -> dict[str, str]:
    return {j["scan"]: j["state"] for j in data["jobs"]}


def job_records(home: Path, profile: str = "ci") -> list[dict[str, Any]]:
    """hpcbridge's own records of what it submitted, one per job."""
    return [j.to_json() for j in JobStore(home, profile).all()]


def per_folder(jobs: list[Any]) -> Counter[str]:
    """How many scheduler jobs ran in each work folder (scripts live in ``<work>/.hpcbridge``)."""
    return Counter(str(Path(j.script).parent.parent) for j in jobs)


def tree(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def ledger_dump() -> list[str]:
    """Every row of the ledger, read without writing to it."""
    path = ledger_path(load_settings())
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return list(db.iterdump())


class Xnat:
    """The test's own view of the sandbox: one admin session, and a count of every file XNAT
    stored (the sandbox runs in this process), so a second upload of a file is seen even when
    it replaced the first."""

    def __init__(
        self, server: SandboxServer, monkeypatch: pytest.MonkeyPatch, timeout: float = T
    ) -> None:
        self.server = server
        self.timeout = timeout
        self.stored: Counter[tuple[Any, str]] = Counter()
        add_file = server.store.add_file

        def counting(resource_id: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            stored = add_file(resource_id, name, *args, **kwargs)
            if stored:
                self.stored[(resource_id, name)] += 1
            return stored

        monkeypatch.setattr(server.store, "add_file", counting)
        self.http = requests.Session()
        self.http.auth = (server.user, server.password)
        self.stats()  # opens this session now, before any count is taken

    def stats(self) -> dict[str, Any]:
        url = self.server.url + "/sandbox/stats"
        data: dict[str, Any] = self.http.get(url, timeout=self.timeout).json()
        return data

    def _scan(self, scan: str) -> str:
        project, subject, experiment, scan_id = scan.split("/")
        return (
            f"{self.server.url}/data/projects/{project}/subjects/{subject}"
            f"/experiments/{experiment}/scans/{scan_id}"
        )

    def files(self, scan: str, resource: str) -> list[str]:
        """The file names in a scan's resource, duplicates kept; [] when it does not exist."""
        resp = self.http.get(
            f"{self._scan(scan)}/resources/{resource}/files",
            params={"format": "json"},
            timeout=self.timeout,
        )
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return sorted(r["Name"] for r in resp.json()["ResultSet"]["Result"])

    def file(self, scan: str, resource: str, name: str) -> bytes:
        url = f"{self._scan(scan)}/resources/{resource}/files/{name}"
        resp = self.http.get(url, timeout=self.timeout)
        resp.raise_for_status()
        return resp.content

    def json_file(self, scan: str, resource: str, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.file(scan, resource, name))
        return data

    def workflows(self, pipeline: str) -> list[dict[str, Any]]:
        """The History entries of a pipeline, oldest first."""
        resp = self.http.get(
            f"{self.server.url}/data/workflows",
            params={"format": "json", "wrk:workflowData/pipeline_name": pipeline},
            timeout=self.timeout,
        )
        resp.raise_for_status()
        fields = [w["data_fields"] for w in resp.json()["items"]]
        return sorted(fields, key=lambda f: int(f["wrk_workflowData_id"]))


def assert_run_1_uploaded_once(xnat: Xnat) -> dict[str, Any]:
    """Run 1 is done with every T1 uploaded: each job submitted and uploaded once by the ledger's
    events, each output file stored by XNAT exactly once (what arrived before a kill was
    recognised by size and MD5 and not sent again). Returns run 1's status."""
    data = status_json(1)
    assert data["run"]["state"] == "done"
    assert states(data) == dict.fromkeys(T1_SCANS, "uploaded")
    with Ledger.for_settings(load_settings()) as ledger:
        assert [r.id for r in ledger.runs()] == [1]
        for job in ledger.jobs(1):
            events = [str(e.to_state) for e in ledger.events(job.job_id)]
            assert events.count("uploaded") == 1 and events.count("submitted") == 1, events
    for scan in T1_SCANS:
        assert xnat.files(scan, "NIFTI") == T1_OUTPUTS  # none missing, none twice
    assert len(xnat.stored) == 3 * len(T1_OUTPUTS), xnat.stored
    assert set(xnat.stored.values()) == {1}, xnat.stored
    return data


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Requests by method and sessions created between two stats snapshots."""
    methods = set(before["requests"]) | set(after["requests"])
    change = {m: after["requests"].get(m, 0) - before["requests"].get(m, 0) for m in methods}
    change["sessions"] = after["sessions_created"] - before["sessions_created"]
    return change
