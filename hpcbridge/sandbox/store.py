"""The sandbox's archive: projects down to scans and assessors, alias tokens and workflows, on
top of the resources and files of ``filestore``.

Everything a restart must keep lives here; server sessions do not, exactly as a Tomcat restart
logs everyone out.
"""

from __future__ import annotations

import re
import time
from typing import Any

from .database import insert
from .filestore import FileStore

# XNAT's own rule for IDs and what its UI allows in labels (XftStringUtils.REGEX_VALID_ID).
VALID_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")


def now_stamp() -> str:
    """XNAT's insert_date format: ``YYYY-MM-DD HH:MM:SS.mmm``."""
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


class Store(FileStore):
    """Thread-safe archive. Row dicts use the column names of the tables in ``database``."""

    def projects(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM projects ORDER BY id")

    def project(self, ident: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM projects WHERE id=? OR secondary_id=?", (ident, ident))

    def create_project(self, pid: str, user: str, **fields: str) -> dict[str, Any]:
        cols = ("secondary_id", "name", "description", "pi_firstname", "pi_lastname")
        row = {c: fields.get(c, "") for c in cols}
        self.insert("projects", {"id": pid, **row, "insert_date": now_stamp(), "insert_user": user})
        return self.project(pid) or {}

    def subjects(self, project: str | None = None) -> list[dict[str, Any]]:
        if project is None:
            return self.query("SELECT * FROM subjects ORDER BY id")
        return self.query("SELECT * FROM subjects WHERE project=? ORDER BY label", (project,))

    def subject(self, ident: str, project: str | None = None) -> dict[str, Any] | None:
        if project is None:
            return self.one("SELECT * FROM subjects WHERE id=?", (ident,))
        return self.one(
            "SELECT * FROM subjects WHERE project=? AND (label=? OR id=?)", (project, ident, ident)
        )

    def create_subject(
        self, project: str, label: str, user: str, gender: str = ""
    ) -> dict[str, Any]:
        row = {"project": project, "label": label, "gender": gender}
        return self.subject(self._create("S", "subjects", row, user)) or {}

    def experiments(
        self, project: str | None = None, subject_id: str | None = None
    ) -> list[dict[str, Any]]:
        sql = (
            "SELECT e.*, s.label AS subject_label FROM experiments e"
            " JOIN subjects s ON s.id = e.subject_id WHERE 1=1"
        )
        args: list[Any] = []
        if project is not None:
            sql += " AND e.project=?"
            args.append(project)
        if subject_id is not None:
            sql += " AND e.subject_id=?"
            args.append(subject_id)
        return self.query(sql + " ORDER BY e.label", tuple(args))

    def experiment(
        self, ident: str, project: str | None = None, subject_id: str | None = None
    ) -> dict[str, Any] | None:
        sql = (
            "SELECT e.*, s.label AS subject_label FROM experiments e"
            " JOIN subjects s ON s.id = e.subject_id WHERE "
        )
        if project is None:
            return self.one(sql + "e.id=?", (ident,))
        row = self.one(sql + "e.project=? AND (e.label=? OR e.id=?)", (project, ident, ident))
        if row and subject_id is not None and row["subject_id"] != subject_id:
            return None
        return row

    def create_experiment(
        self, project: str, subject_id: str, label: str, xsi_type: str, user: str, date: str = ""
    ) -> dict[str, Any]:
        row = {"project": project, "subject_id": subject_id, "label": label, "xsi_type": xsi_type}
        eid = self._create("E", "experiments", row | {"date": date}, user)
        return self.experiment(eid) or {}

    def update_experiment(self, eid: str, **fields: str) -> None:
        for key, value in fields.items():
            if key in ("date", "label"):
                with self.transaction() as db:
                    db.execute(f"UPDATE experiments SET {key}=? WHERE id=?", (value, eid))

    def scans(self, experiment_id: str) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM scans WHERE experiment_id=?", (experiment_id,))
        return sorted(rows, key=lambda r: _natural_key(r["scan_id"]))

    def scan(self, experiment_id: str, scan_id: str) -> dict[str, Any] | None:
        return self.one(
            "SELECT * FROM scans WHERE experiment_id=? AND scan_id=?", (experiment_id, scan_id)
        )

    def put_scan(
        self, experiment_id: str, scan_id: str, xsi_type: str, **fields: str
    ) -> dict[str, Any]:
        names = ("type", "series_description", "quality", "note", "frames")
        key, where = (experiment_id, scan_id), " WHERE experiment_id=? AND scan_id=?"
        with self.transaction() as db:
            # Not INSERT OR IGNORE: an ignored row still takes a pk, which clients see.
            if not db.execute("SELECT 1 FROM scans" + where, key).fetchone():
                row = {"experiment_id": experiment_id, "scan_id": scan_id, "xsi_type": xsi_type}
                insert(db, "scans", row)
            for col in (c for c in names if c in fields):
                db.execute(f"UPDATE scans SET {col}=?" + where, (fields[col], *key))
        return self.scan(experiment_id, scan_id) or {}

    def assessors(self, experiment_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM assessors WHERE experiment_id=? ORDER BY label", (experiment_id,)
        )

    def assessor(self, experiment_id: str, ident: str) -> dict[str, Any] | None:
        return self.one(
            "SELECT * FROM assessors WHERE experiment_id=? AND (id=? OR label=?)",
            (experiment_id, ident, ident),
        )

    def create_assessor(
        self, experiment: dict[str, Any], label: str, xsi_type: str, user: str
    ) -> dict[str, Any]:
        row = {"experiment_id": experiment["id"], "project": experiment["project"], "label": label}
        aid = self._create("E", "assessors", row | {"xsi_type": xsi_type}, user)
        return self.assessor(experiment["id"], aid) or {}

    def _create(self, kind: str, table: str, row: dict[str, Any], user: str) -> str:
        return self.insert_with_id(
            kind, table, {**row, "insert_date": now_stamp(), "insert_user": user}
        )

    def delete_owner(self, kind: str, ident: str) -> None:
        """Delete an object, everything below it, and their files."""
        children: list[tuple[str, str]] = []
        if kind == "project":
            children = [("subject", r["id"]) for r in self.subjects(ident)]
        elif kind == "subject":
            children = [("experiment", r["id"]) for r in self.experiments(subject_id=ident)]
        elif kind == "experiment":
            children = [("scan", str(r["pk"])) for r in self.scans(ident)]
            children += [("assessor", r["id"]) for r in self.assessors(ident)]
        for child in children:
            self.delete_owner(*child)
        for res in self.resources(kind, ident, inout=None):
            self.delete_resource(res["id"])
        table, col = kind + "s", "pk" if kind == "scan" else "id"
        with self.transaction() as db:
            db.execute(f"DELETE FROM {table} WHERE {col}=?", (ident,))

    def add_token(
        self, alias: str, secret: str, login: str, created: int, expires: int
    ) -> dict[str, Any]:
        row = {"alias": alias, "secret": secret, "login": login}
        self.insert("tokens", row | {"created": created, "expires": expires})
        return self.token(alias) or {}

    def token(self, alias: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM tokens WHERE alias=?", (alias,))

    def tokens_of(self, login: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM tokens WHERE login=? ORDER BY id", (login,))

    def delete_token(self, alias: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE alias=?", (alias,))

    def workflows(self, **match: Any) -> list[dict[str, Any]]:
        sql = "SELECT * FROM workflows WHERE 1=1"
        args: list[Any] = []
        for key, value in match.items():
            sql += f" AND {key}=?"
            args.append(value)
        return self.query(sql + " ORDER BY wrk_id", tuple(args))

    def save_workflow(self, row: dict[str, Any]) -> dict[str, Any]:
        cols = "id data_type pipeline_name launch_time status scan_id fields create_user".split()
        values = {c: row.get(c, "") for c in cols}
        if not row.get("wrk_id"):
            return self.workflows(wrk_id=self.insert("workflows", values))[0]
        with self.transaction() as db:
            db.execute(
                f"UPDATE workflows SET {', '.join(c + '=?' for c in cols)} WHERE wrk_id=?",
                (*values.values(), row["wrk_id"]),
            )
        return self.workflows(wrk_id=row["wrk_id"])[0]


def _natural_key(text: str) -> tuple[Any, ...]:
    """Sort scan IDs as numbers where they are numbers ('2' before '10')."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))
