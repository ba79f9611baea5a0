"""The ledger's runs: one per ``hpcbridge run``, with its recipe, parameters and state."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from ..errors import LedgerError
from ..units import utc_stamp
from .database import Database, insert
from .schema import RUN_COLUMNS, JobState, Run, RunState, dumps, parse_state

_COLUMNS = ", ".join(RUN_COLUMNS)


def fetch_run(conn: sqlite3.Connection, run_id: int) -> Run:
    row = conn.execute(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise LedgerError.no_run(run_id)
    return Run.from_row(row)


def _select(conn: sqlite3.Connection, profile: str | None, order: str) -> list[Run]:
    """The runs of ``profile`` (None: of all profiles)."""
    where, args = ("WHERE profile = ?", [profile]) if profile is not None else ("", [])
    rows = conn.execute(f"SELECT {_COLUMNS} FROM runs {where} {order}", args)
    return [Run.from_row(row) for row in rows]


class RunQueries(Database):
    """The :class:`~hpcbridge.ledger.Ledger` methods about whole runs."""

    def create_run(
        self,
        *,
        recipe: str,
        params: Mapping[str, Any],
        target: str,
        profile: str,
        options: Mapping[str, Any],
    ) -> Run:
        values = {
            "recipe": recipe,
            "params": dumps(dict(params), "the recipe parameters"),
            "target": target,
            "profile": profile,
            "options": dumps(dict(options), "the run options"),
            "created": utc_stamp(),
            "state": RunState.ACTIVE.value,
        }
        with self._tx(write=True) as conn:
            return fetch_run(conn, insert(conn, "runs", values))

    def run(self, run_id: int) -> Run:
        with self._tx(write=False) as conn:
            return fetch_run(conn, run_id)

    def latest_run(self, profile: str | None = None) -> Run | None:
        with self._tx(write=False) as conn:
            latest = _select(conn, profile, "ORDER BY id DESC LIMIT 1")
        return latest[0] if latest else None

    def runs(self, profile: str | None = None) -> list[Run]:
        with self._tx(write=False) as conn:
            return _select(conn, profile, "ORDER BY id")

    def overview(
        self, profile: str | None = None, *, limit: int | None = None
    ) -> list[tuple[Run, dict[str, int], str]]:
        """Runs newest first, each with its jobs per state (as :meth:`counts`) and its last
        activity: the latest change to any of its jobs, else its creation."""
        page = f" LIMIT {int(limit)}" if limit is not None else ""
        with self._tx(write=False) as conn:
            runs = _select(conn, profile, f"ORDER BY id DESC{page}")
            ids = [run.id for run in runs]
            per_state = conn.execute(
                "SELECT run_id, state, COUNT(*) AS n, MAX(updated_at) AS last FROM jobs"
                f" WHERE run_id IN ({', '.join('?' * len(ids))}) GROUP BY run_id, state",
                ids,
            ).fetchall()
        counts = {i: {state.value: 0 for state in JobState} for i in ids}
        last = {run.id: run.created for run in runs}
        for row in per_state:
            counts[row["run_id"]][row["state"]] = row["n"]
            last[row["run_id"]] = max(last[row["run_id"]], row["last"])
        return [(run, counts[run.id], last[run.id]) for run in runs]

    def set_run_state(self, run_id: int, state: RunState | str) -> Run:
        value = parse_state(state, RunState)
        with self._tx(write=True) as conn:
            conn.execute("UPDATE runs SET state = ? WHERE id = ?", (value.value, run_id))
            return fetch_run(conn, run_id)
