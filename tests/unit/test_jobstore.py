"""The job records: read once per store, kept in step with its own saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcbridge.jobs import Job, JobStore


def job(job_id: str, state: str = "queued") -> Job:
    return Job(
        id=job_id, scheduler="slurm", host="", script=f"/w/{job_id}/job.sh",
        work_dir=f"/w/{job_id}", name=f"j{job_id}", submitted="2026-11-26T00:00:00Z",
        state=state,
    )  # fmt: skip


def test_all_reads_the_folder_once_and_follows_its_own_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = JobStore(tmp_path, "ci")
    for n in range(50):
        writer.save(job(str(n)))
    store = JobStore(tmp_path, "ci")
    reads: list[str] = []
    real_get = JobStore.get

    def counting_get(self: JobStore, job_id: str) -> Job | None:
        reads.append(job_id)
        return real_get(self, job_id)

    monkeypatch.setattr(JobStore, "get", counting_get)
    assert sorted(j.id for j in store.all()) == sorted(str(n) for n in range(50))
    assert len(reads) == 50
    # a run submits and polls through one store: no second pass over the folder
    store.save(job("7", state="finished"))
    store.save(job("50"))
    listed = store.all()
    assert len(reads) == 50
    assert [j.id for j in listed][-2:] == ["7", "50"]  # latest change last, as on disk
    assert next(j for j in listed if j.id == "7").state == "finished"
    # a fresh store sees the same on disk
    monkeypatch.setattr(JobStore, "get", real_get)
    fresh = {j.id: j.state for j in JobStore(tmp_path, "ci").all()}
    assert len(fresh) == 51 and fresh["7"] == "finished"
