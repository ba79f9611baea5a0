"""A ledger that lost its content is refused loudly, never silently replaced, and a checked copy
of it is kept every day to put back (issue 15, item 6)."""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import sqlite3
import stat
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hpcbridge.cli import main
from hpcbridge.config import load_settings
from hpcbridge.errors import LedgerError
from hpcbridge.ledger import MIGRATIONS, Ledger, backup_folder, ledger_backups, ledger_path

mp = multiprocessing.get_context("fork")
DAY = 86_400.0
START = 1_796_601_600.0  # 2026-12-07T00:00:00Z


@pytest.fixture(params=["wal", "nfs"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("HPCBRIDGE_LEDGER_MODE", str(request.param))
    return str(request.param)


@pytest.fixture()
def path(isolated_home: Path) -> Path:
    return ledger_path(load_settings())


def on_day(n: int) -> Callable[[], float]:
    """A clock for ``Ledger(clock=...)``: noon UTC of day ``n`` after 2026-12-07."""
    return lambda: START + n * DAY + DAY / 2


def add_run(ledger: Ledger, jobs: int = 3) -> int:
    run = ledger.create_run(
        recipe="dcm2niix",
        params={"compress": "y"},
        target="https://xnat.example.org/data/projects/PTV000",
        profile="default",
        options={},
    )
    for scan in range(jobs):
        ledger.add_job(
            run.id,
            address=f"PTV000/Haofei01/Haofei01_MR1/{scan}-{run.id}",
            project="PTV000",
            subject="Haofei01",
            experiment="Haofei01_MR1",
            scan=str(scan),
            name=f"hpcb-{run.id}-{scan}",
        )
    return run.id


def used_ledger(path: Path, mode: str, runs: int = 2, jobs: int = 3) -> list[int]:
    """A ledger with some history, as after a few `hpcbridge run`s; closed."""
    with Ledger(path, mode=mode) as ledger:
        return [add_run(ledger, jobs) for _ in range(runs)]


def status() -> Result:
    return CliRunner().invoke(main, ["status"])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hpcbridge: error: ")
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- a new ledger ---------------------------------------------------------------------------------


def test_a_fresh_home_starts_a_new_ledger_silently(
    path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hpcbridge")
    result = status()
    assert result.exit_code == 2  # only that no run was made yet
    assert "no runs yet" in result.stderr and "ledger" not in result.stderr
    assert path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Ledger(path, mode=mode) as ledger:
        assert ledger.runs() == []
    assert caplog.records == []
    # Nothing but the ledger: no temporary file, no lock, no copy of a ledger never written.
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite"]


def _create_and_write(path: str, mode: str) -> None:
    with Ledger(path, mode=mode) as ledger:
        add_run(ledger, jobs=1)


def test_processes_creating_the_ledger_at_once_share_one(path: Path, mode: str) -> None:
    path.parent.mkdir()
    procs = [mp.Process(target=_create_and_write, args=(str(path), mode)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    with Ledger(path, mode=mode) as ledger:
        assert len(ledger.runs()) == 6
    assert not [p.name for p in path.parent.iterdir() if ".new-" in p.name or ".lock" in p.name]


def test_a_journal_left_by_a_removed_ledger_is_not_replayed_into_a_new_one(
    path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    used_ledger(path, mode)
    old = path.read_bytes()
    path.unlink()
    # What a killed process leaves: the old database's pages in a WAL beside it.
    Path(f"{path}-wal").write_bytes(old[:4096] * 3)
    with Ledger(path, mode=mode) as ledger:
        assert ledger.runs() == []
        add_run(ledger)
    assert f"removing {path}-wal" in caplog.text
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_ledger_that_cannot_be_created_leaves_nothing_behind(
    path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path.parent.mkdir()
    connect = sqlite3.connect

    def full_disk(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if ".new-" in str(database):
            raise sqlite3.OperationalError("database or disk is full")
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", full_disk)
    with pytest.raises(LedgerError, match="cannot create the ledger .*: database or disk is full"):
        Ledger(path, mode=mode)
    assert list(path.parent.iterdir()) == []
    monkeypatch.setattr(sqlite3, "connect", connect)
    with Ledger(path, mode=mode) as ledger:
        assert ledger.runs() == []


# -- an emptied ledger ----------------------------------------------------------------------------


def test_an_emptied_ledger_after_a_run_is_refused_and_left_untouched(path: Path, mode: str) -> None:
    used_ledger(path, mode)
    [backup] = ledger_backups(path)
    path.write_bytes(b"")
    before = path.stat()
    copies = snapshot(backup.parent)

    line = one_line_error(status())

    assert line == (
        f"hpcbridge: error: the ledger {path} is empty (0 bytes) but this machine has used it "
        f"before; refusing to start a new one over it (the last good copy is {backup}: `cp` it "
        "back, or move the empty file away to start afresh)"
    )
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        0,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert snapshot(backup.parent) == copies
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger-backups", "ledger.sqlite"]


def test_an_emptied_ledger_without_a_copy_is_refused_too(path: Path, mode: str) -> None:
    used_ledger(path, mode)
    shutil.rmtree(backup_folder(path))
    path.write_bytes(b"")
    line = one_line_error(status())
    assert line == (
        f"hpcbridge: error: the ledger {path} is empty (0 bytes): what it held is lost; refusing "
        f"to start a new one over it (there is no copy of it in {backup_folder(path)}: move the "
        "empty file away to start afresh)"
    )
    assert path.stat().st_size == 0


def test_the_empty_ledger_message_says_to_delete_a_leftover_wal_first(
    path: Path, mode: str
) -> None:
    used_ledger(path, mode)
    [backup] = ledger_backups(path)
    path.write_bytes(b"")
    Path(f"{path}-wal").write_bytes(b"x" * 100)
    with pytest.raises(LedgerError) as err:
        Ledger(path, mode=mode)
    assert err.value.hint == (
        f"the last good copy is {backup}: `cp` it back, or move the empty file away to start "
        f"afresh; before the `cp`, delete {path}-wal"
    )
    assert Path(f"{path}-wal").read_bytes() == b"x" * 100


def test_a_ledger_emptied_while_open_in_nfs_mode_is_refused_at_the_next_operation(
    path: Path,
) -> None:
    path.parent.mkdir()
    with Ledger(path, mode="nfs") as ledger:
        add_run(ledger)
        path.write_bytes(b"")
        with pytest.raises(LedgerError, match="is empty"):
            ledger.runs()
        path.unlink()
        with pytest.raises(LedgerError, match="cannot open the ledger"):
            ledger.runs()
    assert not path.exists()  # not made again behind the user's back


def test_moving_the_empty_file_away_starts_afresh(path: Path, mode: str) -> None:
    used_ledger(path, mode)
    path.write_bytes(b"")
    path.rename(path.with_name("ledger.sqlite.empty"))
    with Ledger(path, mode=mode) as ledger:
        assert ledger.runs() == []


# -- a damaged ledger -----------------------------------------------------------------------------


def damage_hint(backup: Path) -> str:
    return (
        f"(it is damaged or not a ledger; the last good copy is {backup}: `cp` it back, or move "
        "the damaged file away to start afresh)"
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: b"these are not the runs you are looking for\n" * 200, "file is not a "),
        (lambda data: data[: len(data) // 2], "database disk image is malformed"),
    ],
    ids=["garbage", "half"],
)
def test_a_damaged_ledger_is_refused_in_one_line_naming_the_copy(
    path: Path, mode: str, damage: Callable[[bytes], bytes], reason: str
) -> None:
    used_ledger(path, mode, runs=10, jobs=30)  # pages enough that half loses tables' content
    [backup] = ledger_backups(path)
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    copies = snapshot(backup.parent)

    line = one_line_error(status())

    prefix = f"hpcbridge: error: the ledger {path} cannot be used: "
    assert line.startswith(prefix) and line.endswith(damage_hint(backup))
    assert reason in line
    assert path.read_bytes() == damaged
    assert snapshot(backup.parent) == copies
    assert not Path(f"{path}.lock").exists()


def test_a_ledger_missing_a_table_of_its_schema_is_refused(path: Path, mode: str) -> None:
    used_ledger(path, mode)
    [backup] = ledger_backups(path)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE events")
    damaged = path.read_bytes()
    line = one_line_error(CliRunner().invoke(main, ["status", "1"]))
    assert line == (
        f"hpcbridge: error: the ledger {path} cannot be used: it has no table events, which its "
        f"schema (version {len(MIGRATIONS)}) has {damage_hint(backup)}"
    )
    assert path.read_bytes() == damaged


# -- daily copies ---------------------------------------------------------------------------------


def test_a_copy_is_made_at_most_once_a_day_and_the_last_three_are_kept(
    path: Path, mode: str
) -> None:
    path.parent.mkdir()
    for day in range(5):
        for _ in range(2):  # twice a day, two processes: one copy
            with Ledger(path, mode=mode, clock=on_day(day)) as ledger:
                add_run(ledger, jobs=1)
                add_run(ledger, jobs=1)
        assert [p.name for p in ledger_backups(path)][-1] == f"ledger-2026-12-{7 + day:02d}.sqlite"
    folder = backup_folder(path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "ledger-2026-12-09.sqlite",
        "ledger-2026-12-10.sqlite",
        "ledger-2026-12-11.sqlite",
    ]
    assert folder == path.parent / "ledger-backups"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for copy in folder.iterdir():
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # Each holds the ledger as it was after the first write of its day.
    with closing(sqlite3.connect(f"{ledger_backups(path)[0].as_uri()}?mode=ro", uri=True)) as copy:
        assert copy.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 2 * 2 * 2 + 1


def test_a_ledger_open_for_days_is_copied_every_day(path: Path, mode: str) -> None:
    path.parent.mkdir()
    day = 0
    with Ledger(path, mode=mode, clock=lambda: on_day(day)()) as ledger:
        for day in range(3):  # noqa: B007  (the clock reads it)
            add_run(ledger, jobs=1)
            add_run(ledger, jobs=1)
    assert [p.name for p in ledger_backups(path)] == [
        "ledger-2026-12-07.sqlite",
        "ledger-2026-12-08.sqlite",
        "ledger-2026-12-09.sqlite",
    ]


def test_reading_makes_no_copy(path: Path, mode: str) -> None:
    used_ledger(path, mode)
    shutil.rmtree(backup_folder(path))
    with Ledger(path, mode=mode, clock=on_day(1)) as ledger:
        ledger.runs()
        ledger.jobs(1)
    assert not backup_folder(path).exists()


def test_the_copy_puts_back_the_runs(path: Path, mode: str) -> None:
    path.parent.mkdir()
    with Ledger(path, mode=mode, clock=on_day(0)) as ledger:
        runs = [add_run(ledger) for _ in range(3)]
    with Ledger(path, mode=mode, clock=on_day(1)) as ledger:
        ledger.transition(1, "failed", detail="the next day's first write")  # makes the copy
        before = [(r, ledger.jobs(r.id), ledger.events(1)) for r in ledger.runs()]
        add_run(ledger)  # after the copy: lost with the ledger
    backup = ledger_backups(path)[-1]
    assert backup.name == "ledger-2026-12-08.sqlite"
    path.write_bytes(b"")
    assert status().exit_code == 1
    shutil.copy(backup, path)  # the `cp` the message asks for
    with Ledger(path, mode=mode) as ledger:
        assert [r.id for r in ledger.runs()] == runs
        assert [(r, ledger.jobs(r.id), ledger.events(1)) for r in ledger.runs()] == before
    result = CliRunner().invoke(main, ["--json", "status"])
    assert result.exit_code == 0, result.stderr
    assert '"id": 3' in result.stdout


def _corrupt_an_index(path: Path) -> None:
    """Damage that opens and takes writes (runs are not indexed by it) but fails quick_check."""
    with closing(sqlite3.connect(path)) as conn, conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs_address'")
        page = root.fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as file:
        file.seek((page - 1) * size)
        file.write(b"\x0d" + b"\xff" * 64)  # a leaf whose cell count and offsets point nowhere


def test_a_damaged_ledger_never_replaces_the_last_good_copy(
    path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir()
    with Ledger(path, mode=mode, clock=on_day(0), keep_backups=1) as ledger:
        add_run(ledger)
    [good] = ledger_backups(path)
    kept = good.read_bytes()
    _corrupt_an_index(path)
    with Ledger(path, mode=mode, clock=on_day(1), keep_backups=1) as ledger:
        ledger.create_run(recipe="r", params={}, target="t", profile="p", options={})
    assert ledger_backups(path) == [good]
    assert good.read_bytes() == kept
    assert [p.name for p in backup_folder(path).iterdir()] == [good.name]  # no temporary left
    assert f"the ledger {path} fails SQLite's quick_check" in caplog.text
    assert f"the last good copy stays {good}" in caplog.text


def test_a_failed_copy_warns_and_the_write_stands(
    path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    path.parent.mkdir()
    backup_folder(path).write_text("a file where the folder should be\n")
    with Ledger(path, mode=mode) as ledger:
        run_id = add_run(ledger)
        assert ledger.run(run_id).id == run_id
    assert f"could not back up the ledger {path}" in caplog.text


def test_an_upgrade_copies_the_ledger_before_migrating(
    path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hpcbridge import ledger as ledger_mod

    used_ledger(path, mode)
    shutil.rmtree(backup_folder(path))
    later = [*MIGRATIONS, "CREATE TABLE notes (text TEXT)"]
    monkeypatch.setattr(ledger_mod.schema, "MIGRATIONS", later)
    with Ledger(path, mode=mode, clock=on_day(1)) as ledger:
        assert len(ledger.runs()) == 2
    [backup] = ledger_backups(path)
    with closing(sqlite3.connect(backup)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_helpers_name_the_folder_and_the_copies(tmp_path: Path) -> None:
    ledger = tmp_path / "lab.db"
    assert backup_folder(ledger) == tmp_path / "lab-backups"
    assert ledger_backups(ledger) == []
    (tmp_path / "lab-backups").mkdir()
    for name in ("lab-2026-12-08.db", "lab-2026-12-07.db", "lab-2026-12-07.sqlite", "notes.txt"):
        (tmp_path / "lab-backups" / name).write_text("")
    assert [p.name for p in ledger_backups(ledger)] == ["lab-2026-12-07.db", "lab-2026-12-08.db"]
