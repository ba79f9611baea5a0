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


def test_a_queued_job_is_not_judged_by_a_status_file_left_in_its_folder(tmp_path: Path) -> None:
    """A requeued job (or a folder reused by hand) may hold an old outcome: while the
    scheduler says the job waits, that file is not this attempt's and is not read."""
    from hpcbridge.jobs import _resolve
    from hpcbridge.schedulers.base import JobStatus, State
    from hpcbridge.transport import LocalTransport

    record = job("9")
    record.work_dir = str(tmp_path)
    (tmp_path / ".hpcbridge").mkdir()
    (tmp_path / ".hpcbridge" / "status.json").write_text('{"exit_code": 0, "end": "x"}')
    waiting = JobStatus("9", State.QUEUED, "PENDING", reason="Priority")
    after = _resolve(record, waiting, LocalTransport())
    assert (after.state, after.raw_state, after.reason) == ("queued", "PENDING", "Priority")
    assert after.exit_code is None
    # once the scheduler has run it, the file is its outcome
    ended = _resolve(record, JobStatus("9", State.FINISHED, "COMPLETED"), LocalTransport())
    assert (ended.state, ended.exit_code) == ("finished", 0)
