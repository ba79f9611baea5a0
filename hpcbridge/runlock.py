"""The per-run lock: one process at a time moves a run (``sync``, ``run``, ``retry``, ``cancel``).

Two passes over one run at once would both upload every finished scan and fight over the same
jobs, so each takes the run's lock first. Home directories, and so the ledger and its locks, are
often on NFS, where ``fcntl``/``flock`` locks are unreliable or local to one host. So the lock is
a file, written under a name of its own and hard-linked into place (``link()`` is atomic on NFS,
and the lock is never seen empty), holding who took it: host, pid, user, command, a random token
and the time.

A lock left by a process that died (``kill -9``, a reboot) is taken over when its holder is a
process on this host that no longer exists, or when its file has not been touched for
``stale_after`` seconds (a holder on another host cannot be asked). While it is held, a thread
touches the file every ``heartbeat`` seconds, so a long ``--wait`` or a long upload never looks
stale.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LedgerError, RunBusyError
from .ledger.files import HOST, break_stale_lock, ledger_path, look, pid_alive, remove_if_ours
from .units import UTC_STAMP, parse_utc_stamp, utc_stamp

if TYPE_CHECKING:
    from .config import Settings

__all__ = ["BUSY_WAIT", "Holder", "RunLock", "lock_path"]

log = logging.getLogger(__name__)

#: Seconds ``retry`` and ``cancel --run`` wait for a busy run before giving up: long enough for
#: a cron pass without uploads to end, short enough for someone at a terminal.
BUSY_WAIT = 30.0
#: Seconds without a heartbeat after which a lock from another host is taken over.
STALE_AFTER = 600.0
#: A lock file still empty after this long lost its writer between creating and writing it.
_EMPTY_STALE = 60.0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return str(os.getuid())


def lock_path(settings: Settings, run_id: int) -> Path:
    """``locks/run-<id>.lock`` beside the ledger, so every process sharing a ledger (whatever
    its ``HPCBRIDGE_HOME``) sees the same locks; a ledger not named ``ledger.sqlite`` prefixes
    its name, so two ledgers in one folder do not share them."""
    ledger = ledger_path(settings)
    prefix = "" if ledger.name == "ledger.sqlite" else f"{ledger.name}-"
    return ledger.parent / "locks" / f"{prefix}run-{run_id}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock, as its file says."""

    host: str
    pid: int
    user: str
    command: str
    since: str  # UTC stamp
    token: str

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            values: dict[str, Any] = {f.name: str(data[f.name]) for f in fields(cls)}
            return cls(**{**values, "pid": int(data["pid"])})
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    def describe(self) -> str:
        """``sync by alice on login2 (pid 4242) since 10:02`` (local time; with the date when
        it was not today)."""
        try:
            when = parse_utc_stamp(self.since).astimezone()
        except ValueError:
            shown = self.since
        else:
            today = datetime.now(timezone.utc).astimezone().date()
            shown = when.strftime("%H:%M" if when.date() == today else "%Y-%m-%d %H:%M")
        if not self.token:
            return f"a process that is starting (since {shown})"
        return f"{self.command} by {self.user} on {self.host} (pid {self.pid}) since {shown}"

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("command", "user", "host", "pid", "since")}


class RunLock:
    """The lock of run ``run_id``, in the file ``path``.

    ``acquire`` returns the lock held (use it in ``with``, which releases it whatever happens)
    or raises :class:`~hpcbridge.errors.RunBusyError` naming the holder.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        run_id: int,
        *,
        command: str,
        stale_after: float = STALE_AFTER,
        heartbeat: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.command = command
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._mine: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lost: Holder | None = None

    @classmethod
    def for_settings(cls, settings: Settings, run_id: int, *, command: str) -> RunLock:
        return cls(lock_path(settings, run_id), run_id, command=command)

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self._mine is not None})"

    @property
    def held(self) -> bool:
        return self._mine is not None

    # -- taking and giving back ------------------------------------------------------------------

    def acquire(
        self,
        *,
        wait: float | None = 0.0,
        poll: float = 0.5,
        on_busy: Callable[[Holder], None] | None = None,
    ) -> RunLock:
        """Take the lock; wait up to ``wait`` seconds for a live holder (None: for as long as
        it takes). ``on_busy(holder)`` is called once when the run is found busy."""
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            holder = self._try_take()
            if holder is None:
                self._start_heartbeat()
                return self
            if on_busy is not None and not told:
                on_busy(holder)
                told = True
            if deadline is not None and time.monotonic() >= deadline:
                raise self._busy(holder, wait or 0.0)
            pause = poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0))
            time.sleep(pause)

    def _busy(self, holder: Holder, waited: float) -> RunBusyError:
        message = f"run {self.run_id} is busy: {holder.describe()}"
        if waited > 0:
            message += f"; gave up after {waited:g} s"
        return RunBusyError(
            message,
            hint=f"try again once it has ended; if that process is gone, delete {self.path}",
            run_id=self.run_id,
            holder=holder,
        )

    def _try_take(self) -> Holder | None:
        """None once the lock is ours; else its live holder."""
        mine = Holder(
            host=HOST,
            pid=os.getpid(),
            user=_user(),
            command=self.command,
            since=utc_stamp(),
            token=secrets.token_hex(8),
        )
        for _ in range(10):  # a lock released or broken under our eyes: look again
            if self._create(mine):
                self._mine = mine
                return None
            found = look(self.path, "run lock")
            if found is None:
                continue
            seen, age = found
            holder = Holder.parse(seen)
            if not self._stale(holder, age):
                return holder or self._starting(age)
            self._break(seen, holder)
        return self._starting(0.0)

    def _create(self, mine: Holder) -> bool:
        """Put the lock in place with its holder already written: whether it is ours now.

        The holder is written to a file of our own and hard-linked to the lock's name, so the
        lock never exists empty (a second `sync` reading it then could not say who holds it).
        link() is atomic on NFS too; its answer may be lost there, so the link count decides.
        """
        tmp = self.path.with_name(f".{self.path.name}.{HOST}.{os.getpid()}.{mine.token}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, mine.dump().encode())
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LedgerError(f"cannot create the run lock {self.path}: {exc.strerror}") from None
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as exc:
            with contextlib.suppress(OSError):
                if os.stat(tmp).st_nlink == 2:
                    return True
            raise LedgerError(f"cannot create the run lock {self.path}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return True

    def _starting(self, age: float) -> Holder:
        # Created but not yet written: its holder is between two system calls.
        since = datetime.fromtimestamp(time.time() - age, timezone.utc).strftime(UTC_STAMP)
        return Holder(host="?", pid=0, user="?", command="?", since=since, token="")

    def _stale(self, holder: Holder | None, age: float) -> bool:
        if holder is None:
            return age > _EMPTY_STALE
        if age > self.stale_after:  # a live holder touches it every `heartbeat` seconds
            return True
        return holder.host == HOST and not pid_alive(holder.pid)

    def _break(self, seen: str, holder: Holder | None) -> None:
        if break_stale_lock(self.path, seen, "run lock"):
            who = holder.describe() if holder else "an unfinished lock file"
            log.warning(
                "run %d: took over its stale lock (%s is no longer running)", self.run_id, who
            )

    def release(self) -> None:
        mine, self._mine = self._mine, None
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if mine is not None and not remove_if_ours(
            self.path, lambda seen: Holder.parse(seen) == mine, "run lock"
        ):
            log.warning(
                "run %d: its lock %s was taken over while this process held it",
                self.run_id,
                self.path,
            )

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- while it is held ------------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._lost = None
        self._beat = threading.Thread(
            target=self._beating, name=f"run-{self.run_id}-lock", daemon=True
        )
        self._beat.start()

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self.touch()

    def touch(self) -> None:
        """The heartbeat: refresh the file's time if it is still ours; remember who took it
        if it is not."""
        mine = self._mine
        if mine is None:
            return
        try:
            current = Holder.parse(self.path.read_text())
            if current == mine:
                os.utime(self.path)
                return
        except FileNotFoundError:
            current = None
        except OSError as exc:
            log.warning("cannot refresh the run lock %s: %s", self.path, exc)
            return
        if self._lost is None:
            self._lost = current or self._starting(0.0)
            log.warning(
                "run %d: its lock %s was taken over by %s",
                self.run_id,
                self.path,
                self._lost.describe(),
            )

    def check(self) -> None:
        """Raise RunBusyError if another process took the lock over (this one was stopped for
        longer than ``stale_after``): going on would interleave with it."""
        self.touch()
        if self._lost is not None:
            raise RunBusyError(
                f"run {self.run_id} was taken over by {self._lost.describe()} while this "
                "process held it; stopped",
                hint=f"its lock looked stale (no heartbeat for {self.stale_after:g} s)",
                run_id=self.run_id,
                holder=self._lost,
            )
