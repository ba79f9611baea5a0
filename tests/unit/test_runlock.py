"""The per-run lock file: taken atomically, stale locks taken over, released whatever happens."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcbridge.config import load_settings
from hpcbridge.errors import RunBusyError
from hpcbridge.runlock import RunLock, lock_path


def dead_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    return int(proc.stdout)


def plant(path: Path, *, host: str, pid: int, age: float = 0.0, command: str = "sync") -> None:
    """A lock file as another process would have left it, last touched ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))
    data = {"host": host, "pid": pid, "user": "alice", "command": command, "since": since}
    path.write_text(json.dumps({**data, "token": "feedbeef"}) + "\n")
    os.utime(path, (time.time() - age, time.time() - age))


@pytest.fixture()
def path(tmp_path: Path) -> Path:
    return tmp_path / "locks" / "run-3.lock"


def test_the_lock_file_says_who_holds_it_and_goes_when_released(path: Path) -> None:
    with RunLock(path, 3, command="sync").acquire() as lock:
        assert lock.held
        data = json.loads(path.read_text())
        assert data["host"] == socket.gethostname() and data["pid"] == os.getpid()
        assert data["command"] == "sync" and len(data["token"]) == 16
        assert data["since"].endswith("Z")
    assert not path.exists()


def test_a_held_run_is_busy_naming_its_holder(path: Path) -> None:
    with RunLock(path, 3, command="run --wait").acquire():
        with pytest.raises(RunBusyError) as caught:
            RunLock(path, 3, command="sync").acquire()
    message = caught.value.message
    host = socket.gethostname()
    assert message.startswith("run 3 is busy: run --wait by ")
    assert f" on {host} (pid {os.getpid()}) since " in message
    assert caught.value.run_id == 3 and caught.value.exit_code == 1


def test_waiting_gives_up_after_the_limit_with_the_same_line(path: Path) -> None:
    plant(path, host=socket.gethostname(), pid=os.getpid())
    seen = []
    start = time.monotonic()
    with pytest.raises(RunBusyError) as caught:
        RunLock(path, 3, command="retry").acquire(wait=0.3, poll=0.05, on_busy=seen.append)
    assert time.monotonic() - start >= 0.3
    assert len(seen) == 1 and seen[0].user == "alice"
    assert caught.value.message.startswith("run 3 is busy: sync by alice on ")
    assert caught.value.message.endswith("; gave up after 0.3 s")
    assert path.exists()  # someone else's lock is left alone


def test_a_lock_freed_while_waiting_is_taken(path: Path) -> None:
    plant(path, host=socket.gethostname(), pid=os.getpid())
    first = RunLock(path, 3, command="sync")

    def free(_holder: object) -> None:
        path.unlink()  # the holder ends between two looks

    with first.acquire(wait=5, poll=0.05, on_busy=free):
        assert json.loads(path.read_text())["token"] != "feedbeef"


def test_a_dead_process_of_this_host_leaves_a_lock_that_is_taken_over(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    plant(path, host=socket.gethostname(), pid=pid)
    with caplog.at_level(logging.WARNING), RunLock(path, 3, command="sync").acquire():
        assert json.loads(path.read_text())["pid"] == os.getpid()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("run 3: took over its stale lock (sync by alice on ")
    assert f"(pid {pid})" in lines[0] and lines[0].endswith("is no longer running)")


def test_a_lock_of_another_host_is_respected_until_it_is_older_than_the_limit(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A pid on another host says nothing here: a dead one does not make the young lock stale,
    # a live one does not keep the old lock.
    plant(path, host="login2.example.org", pid=dead_pid(), age=500)
    with pytest.raises(RunBusyError) as caught:
        RunLock(path, 3, command="sync", stale_after=600).acquire()
    assert "sync by alice on login2.example.org (pid " in caught.value.message

    plant(path, host="login2.example.org", pid=os.getpid(), age=700)
    with (
        caplog.at_level(logging.WARNING),
        RunLock(path, 3, command="sync", stale_after=600).acquire(),
    ):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert any("took over its stale lock" in r.getMessage() for r in caplog.records)


def test_a_live_process_of_this_host_is_respected(path: Path) -> None:
    plant(path, host=socket.gethostname(), pid=os.getpid(), age=30)
    with pytest.raises(RunBusyError):
        RunLock(path, 3, command="sync", stale_after=600).acquire()


def test_the_lock_is_released_after_an_exception(path: Path) -> None:
    with pytest.raises(ZeroDivisionError), RunLock(path, 3, command="sync").acquire():
        1 / 0  # noqa: B018
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), RunLock(path, 3, command="sync").acquire():
        raise KeyboardInterrupt
    assert not path.exists()


def test_the_heartbeat_keeps_a_long_holder_fresh(path: Path) -> None:
    with RunLock(path, 3, command="run --wait", heartbeat=0.05).acquire():
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        deadline = time.monotonic() + 5
        while time.time() - path.stat().st_mtime > 10:
            assert time.monotonic() < deadline, "the heartbeat did not touch the lock"
            time.sleep(0.02)


def test_a_holder_whose_lock_was_taken_over_stops(path: Path) -> None:
    lock = RunLock(path, 3, command="run --wait").acquire()
    try:
        path.unlink()
        plant(path, host="login2", pid=1)
        with pytest.raises(RunBusyError) as caught:
            lock.check()
        assert caught.value.message.startswith("run 3 was taken over by sync by alice on login2")
    finally:
        lock.release()
    assert path.exists()  # the new holder's lock is not ours to remove


def test_the_locks_live_beside_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPCBRIDGE_HOME", str(tmp_path / "home"))
    assert lock_path(load_settings(), 3) == tmp_path / "home" / "locks" / "run-3.lock"
    monkeypatch.setenv("HPCBRIDGE_LEDGER", str(tmp_path / "shared" / "lab.sqlite"))
    assert lock_path(load_settings(), 3) == tmp_path / "shared" / "locks" / "lab.sqlite-run-3.lock"


def test_a_busy_run_always_names_its_holder_even_while_it_is_being_taken(path: Path) -> None:
    """The lock never exists without its holder written in it: a second `sync` arriving the
    instant the first takes it must still say who holds it (cron mails that line)."""
    import threading

    said: list[str] = []
    stop = time.monotonic() + 3.0

    def contend() -> None:
        while time.monotonic() < stop:
            try:
                with RunLock(path, 3, command="sync", heartbeat=60).acquire():
                    pass
            except RunBusyError as exc:
                said.append(exc.message)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert said, "four processes taking one lock for 3 s never found it busy"
    assert all(" by " in m and f"(pid {os.getpid()})" in m for m in said), {
        m for m in said if " by " not in m
    }
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temporary files left
