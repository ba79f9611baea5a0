"""The private files that credentials and cached sessions live in, used by many processes at
once (a chain's transfer jobs share their chain folder's token and session cache)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from hpcbridge.credentials import SessionCache, read_private, write_private
from hpcbridge.errors import CredentialError

URL = "https://xnat.example.org"


def test_many_writers_and_readers_of_one_file_see_whole_versions(tmp_path: Path) -> None:
    path = tmp_path / "home" / "sessions" / "s.json"
    write_private(path, {"n": -1})
    errors: list[BaseException] = []
    seen: list[object] = []
    stop = threading.Event()

    def write(k: int) -> None:
        try:
            for i in range(100):
                write_private(path, {"n": k * 1000 + i, "pad": "x" * 4000})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read() -> None:
        try:
            while not stop.is_set():
                data = read_private(path)
                seen.append(data["n"] if data else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(k,)) for k in range(6)]
    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert None not in seen and seen
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.json"]  # no temp file left
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_reader_waits_for_a_file_a_writer_is_putting_in_place(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    # what a writer that cannot rename over the target (plain SFTP) leaves for a moment
    tmp = tmp_path / ".credentials.json.4b1d2c.part"
    tmp.write_text(json.dumps({"servers": {}}))
    os.chmod(tmp, 0o600)

    def finish() -> None:
        time.sleep(0.1)
        os.replace(tmp, path)

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        assert read_private(path) == {"servers": {}}
    finally:
        writer.join()


def test_a_missing_file_with_no_writer_about_is_none_at_once(tmp_path: Path) -> None:
    stale = tmp_path / ".credentials.json.123.part"  # a crashed writer's, long ago
    stale.write_text("{}")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    started = time.monotonic()
    assert read_private(tmp_path / "credentials.json") is None
    assert time.monotonic() - started < 0.05


def test_a_damaged_cached_session_is_a_miss_and_the_next_save_replaces_it(
    tmp_path: Path,
) -> None:
    cache = SessionCache.under(tmp_path)
    cache.put(URL, "alice", "ABC")
    (path,) = cache.folder.iterdir()
    path.write_text('{"jsessionid": "AB')  # torn by a crash
    assert cache.get(URL, "alice") is None
    cache.put(URL, "alice", "DEF")
    assert cache.get(URL, "alice") == "DEF"


def test_a_cached_session_others_can_read_is_still_refused(tmp_path: Path) -> None:
    cache = SessionCache.under(tmp_path)
    cache.put(URL, "alice", "ABC")
    (path,) = cache.folder.iterdir()
    path.chmod(0o644)
    with pytest.raises(CredentialError, match="readable by other users"):
        cache.get(URL, "alice")


def test_a_session_that_cannot_be_saved_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("a file where the folder should be")
    SessionCache.under(blocker).put(URL, "alice", "ABC")
    assert "could not save the XNAT session for the next run: cannot write" in caplog.text
    with pytest.raises(CredentialError, match="cannot write"):
        write_private(blocker / "credentials.json", {})


def test_processes_renewing_a_dead_session_at_once_open_one(tmp_path: Path) -> None:
    cache = SessionCache.under(tmp_path)
    cache.put(URL, "alice", "DEAD")
    logins: list[str] = []
    got: list[str] = []

    def job(k: int) -> None:
        with cache.renewal(URL, "alice", "DEAD") as newer:
            if newer is None:
                time.sleep(0.1)  # the login's round trip
                logins.append(f"NEW{k}")
                cache.put(URL, "alice", f"NEW{k}")
                newer = f"NEW{k}"
        got.append(newer)

    threads = [threading.Thread(target=job, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(logins) == 1
    assert got == logins * 8
    # a later process that finds the new one dead too logs in again
    with cache.renewal(URL, "alice", logins[0]) as newer:
        assert newer is None


def test_without_locks_each_process_renews_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, how: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cache = SessionCache.under(tmp_path)
    with cache.renewal(URL, "alice", None) as newer:
        assert newer is None
    cache.put(URL, "alice", "ABC")
    with cache.renewal(URL, "alice", None) as newer:
        assert newer == "ABC"
