"""The job records: read once per store, kept in step with its own saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcbridge.jobs import Job, JobStore


def job(job_id: str, state: str = "queued") -> Job:
    return Job(
        native_id=job_id, scheduler="slurm", host="", script=f"/w/{job_id}/job.sh",
        work_dir=f"/w/{job_id}", name=f"j{job_id}", submitted="2026-11-26T00:00:00Z",
        state=state,
    )  # fmt: skip


def test_live_reads_the_folder_once_and_follows_its_own_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = JobStore(tmp_path, "ci")
    for n in range(50):
        writer.save(job(str(n)))
    store = JobStore(tmp_path, "ci")
    reads: list[str] = []
    real_read = JobStore._read

    def counting_read(self: JobStore, path: Path, job_id: str) -> Job | None:
        reads.append(job_id)
        return real_read(self, path, job_id)

    monkeypatch.setattr(JobStore, "_read", counting_read)
    assert sorted(j.native_id for j in store.live()) == sorted(str(n) for n in range(50))
    assert len(reads) == 50
    # a run submits and polls through one store: no second pass over the folder
    store.save(job("7", state="finished"))
    store.save(job("50"))
    live = store.live()
    assert len(reads) == 50
    assert [j.native_id for j in live][-1] == "50"  # latest change last, as on disk
    assert "7" not in {j.native_id for j in live}  # it ended
    # a fresh store sees the same on disk; listings have the ended one too, changed last but one
    monkeypatch.setattr(JobStore, "_read", real_read)
    fresh = JobStore(tmp_path, "ci")
    assert len(fresh.live()) == 50
    everyone = fresh.all()
    assert len(everyone) == 51 and [j.native_id for j in everyone][-2:] == ["7", "50"]
    assert fresh.get("7") is not None and fresh.get("7").state == "finished"  # type: ignore[union-attr]


def test_ended_jobs_leave_the_live_folder_so_a_long_history_costs_polls_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(tmp_path, "ci")
    for n in range(200):
        store.save(job(str(n), state="finished" if n < 198 else "running"))
    assert len(list(store.dir.glob("*.json"))) == 2
    assert len(list(store.ended_dir.glob("*.json"))) == 198
    reads: list[str] = []
    real_read = JobStore._read

    def counting_read(self: JobStore, path: Path, job_id: str) -> Job | None:
        reads.append(job_id)
        return real_read(self, path, job_id)

    monkeypatch.setattr(JobStore, "_read", counting_read)
    assert sorted(j.native_id for j in JobStore(tmp_path, "ci").live()) == ["198", "199"]
    assert sorted(reads) == ["198", "199"]
    # a listing of what ended lately reads only records changed since then
    import os
    import time

    for n in range(190):
        path = store.ended_dir / f"{n}.json"
        os.utime(path, (time.time() - 3 * 86400,) * 2)
    reads.clear()
    recent = JobStore(tmp_path, "ci").all(ended_since=time.time() - 86400)
    assert sorted(j.native_id for j in recent) == sorted(
        ["198", "199", *(str(n) for n in range(190, 198))]
    )
    assert len(reads) == 10


def test_records_from_before_the_ended_folder_are_moved_there_on_first_read(
    tmp_path: Path,
) -> None:
    import json

    folder = tmp_path / "jobs" / "ci"
    folder.mkdir(parents=True)
    for n, state in enumerate(["finished", "failed", "queued"]):
        (folder / f"{n}.json").write_text(json.dumps(job(str(n), state=state).stored()))
    store = JobStore(tmp_path, "ci")
    assert [j.native_id for j in store.live()] == ["2"]
    assert sorted(p.name for p in store.ended_dir.iterdir()) == ["0.json", "1.json"]
    assert sorted(p.name for p in folder.glob("*.json")) == ["2.json"]
    assert {j.native_id for j in store.all()} == {"0", "1", "2"}


def test_a_queued_job_is_not_judged_by_a_status_file_left_in_its_folder(tmp_path: Path) -> None:
    """A requeued job (or a folder reused by hand) may hold an old outcome: while the
    scheduler says the job waits, that file is not this attempt's and is not read."""
    from hpcbridge.schedulers.base import JobStatus, State
    from hpcbridge.schedulers.outcome import resolve as _resolve
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
