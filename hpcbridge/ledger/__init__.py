"""The run ledger: an SQLite record of runs, their jobs, and every state change of every job.

A run over a thousand scans must survive being killed at any moment, and a cron ``sync`` may
write while a user's ``status`` reads. So every state change is one transaction (the job row and
its event together), writers take the database lock up front (``BEGIN IMMEDIATE``) so two writers
never deadlock half-way, and a job's state can only move along :data:`TRANSITIONS`: a second
process acting on a stale picture of a job gets a :class:`~hpcbridge.errors.LedgerError` instead
of silently undoing the first one's work.

Two modes, because many clusters put home directories on NFS:

- ``wal`` (default): write-ahead log, readers never block the writer. WAL keeps its index in a
  shared-memory file, which only works when every process is on one host's local file system.
- ``nfs``: rollback journal and ``synchronous=FULL``; each operation opens a fresh connection
  (NFS only guarantees that an ``open`` sees what another host wrote before its ``close``) and
  holds a lock file made with ``O_CREAT|O_EXCL``, which NFS does atomically even where its byte
  range locks, which SQLite relies on, are broken or local to one host.

The schema, its states and rows are in :mod:`.schema`; the file, its copies and its lock file in
:mod:`.files`; connection and transactions in :mod:`.database`, on which the queries of
:mod:`.runs` and :mod:`.jobs` build; :class:`Ledger` puts them together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The names used outside the package.
from .files import backup_folder, ledger_backups, ledger_path  # noqa: F401
from .jobs import JobQueries
from .runs import RunQueries
from .schema import FINAL_STATES, MIGRATIONS, TRANSITIONS, Event, JobRow, JobState, Run, RunState  # noqa: F401

if TYPE_CHECKING:
    from ..config import Settings


class Ledger(RunQueries, JobQueries):
    """The ledger file at ``path``; safe to share between processes and, per object, threads.

    ``busy_timeout`` bounds waiting for SQLite's own lock; in ``nfs`` mode ``lock_timeout``
    bounds waiting for the lock file, and a lock file older than ``stale_after`` seconds or
    whose holder is a dead process on this host is taken over.

    The first write of a UTC day (by ``clock``) leaves a checked copy of the ledger in
    :func:`backup_folder`, which keeps the newest ``keep_backups`` (0: no copies). An empty or
    damaged ledger file is refused with a :class:`~hpcbridge.errors.LedgerError` naming the
    last good copy, and never written over.
    """

    @classmethod
    def for_settings(cls, settings: Settings, **kwargs: Any) -> Ledger:
        """The ledger the settings name (see :func:`ledger_path`), in their ``ledger_mode``."""
        return cls(ledger_path(settings), mode=settings.ledger_mode, **kwargs)
