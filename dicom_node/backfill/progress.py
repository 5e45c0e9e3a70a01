"""The backfill's own progress store, ``<data_dir>/backfill.sqlite3``: runs, the days queried and every study
found, asked for and completed, so that a re-run (after a kill, a reboot, a closed window) continues where the
last one stopped and never asks again for a study that is complete.

It is kept apart from the node's ``state.sqlite3`` (the node's single writer stays the node); what arrived is read
from the node's state store. Study states: ``found`` (listed by the PACS) -> ``asked`` (a C-MOVE/C-GET/REST fetch
started) -> ``complete`` or ``incomplete`` (retried by the next run, with the reason kept).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node.store.sqlite_store import SqliteStore

FILE_NAME = "backfill.sqlite3"


class BackfillState(StrEnum):
    FOUND = "found"
    ASKED = "asked"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    method TEXT NOT NULL,
    since TEXT NOT NULL,
    until TEXT NOT NULL,
    modality TEXT NOT NULL,
    options TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    outcome TEXT,
    asked INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    incomplete INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS days (
    source TEXT NOT NULL,
    day TEXT NOT NULL,
    modality TEXT NOT NULL,
    queried_at REAL NOT NULL,
    found INTEGER NOT NULL,
    PRIMARY KEY (source, day, modality)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    study_date TEXT NOT NULL,
    modalities TEXT NOT NULL,
    expected INTEGER,
    source_ref TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    found_at REAL NOT NULL,
    asked_at REAL,
    completed_at REAL,
    held INTEGER,
    sub_completed INTEGER,
    sub_failed INTEGER,
    reason TEXT,
    run_id INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS studies_by_date ON studies(source, study_date);
"""


@dataclass(frozen=True)
class StudyHit:
    """One study the source listed: what the backfill needs to fetch it and to know when it is complete."""

    study_uid: str
    study_date: str  # YYYYMMDD (the day it was found under)
    modalities: tuple[str, ...]
    expected: int | None  # instances the source holds (None: it did not say)
    source_ref: str | None = None  # the source's own id (Orthanc's study id)


@dataclass(frozen=True)
class BackfillStudy:
    study_uid: str
    source: str
    study_date: str
    modalities: tuple[str, ...]
    expected: int | None
    source_ref: str | None
    state: BackfillState
    attempts: int
    held: int | None
    reason: str | None

    def hit(self) -> StudyHit:
        return StudyHit(self.study_uid, self.study_date, self.modalities, self.expected, self.source_ref)


class BackfillStore(SqliteStore):
    """Typed access to ``backfill.sqlite3`` (WAL; one short transaction per write, like the node's store)."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)

    @classmethod
    def in_data_dir(cls, data_dir: Path | str) -> BackfillStore:
        return cls(Path(data_dir) / FILE_NAME)

    # --- runs ---------------------------------------------------------------------------------------

    def start_run(self, source: str, method: str, since: date, until: date, modality: str,
                  options: dict[str, Any]) -> int:
        with self._transaction() as db:
            cursor = db.execute("INSERT INTO runs (source, method, since, until, modality, options, started_at)"
                                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (source, method, f"{since:%Y%m%d}", f"{until:%Y%m%d}", modality,
                                 json.dumps(options, sort_keys=True), time.time()))
            return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, outcome: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE runs SET finished_at = ?, outcome = ? WHERE id = ?", (time.time(), outcome, run_id))

    def runs(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM runs ORDER BY id")

    # --- days -----------------------------------------------------------------------------------------

    def day_done(self, source: str, day: date, modality: str) -> bool:
        """True when this day was queried after it was over (a day queried while it ran may have grown)."""
        rows = self._query("SELECT queried_at FROM days WHERE source = ? AND day = ? AND modality = ?",
                           (source, f"{day:%Y%m%d}", modality))
        if not rows:
            return False
        day_over = datetime.combine(day + timedelta(days=1), datetime.min.time()).timestamp()
        return float(rows[0]["queried_at"]) >= day_over

    def record_day(self, source: str, day: date, modality: str, hits: list[StudyHit], run_id: int) -> None:
        """The day's studies (new ones as ``found``; known ones keep their state) and the day as queried."""
        now = time.time()
        with self._transaction() as db:
            for hit in hits:
                db.execute(
                    "INSERT INTO studies (study_uid, source, study_date, modalities, expected, source_ref, state,"
                    " found_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET"
                    " expected = COALESCE(excluded.expected, expected), source_ref = excluded.source_ref,"
                    " modalities = excluded.modalities",
                    (hit.study_uid, source, hit.study_date, "\\".join(hit.modalities), hit.expected, hit.source_ref,
                     BackfillState.FOUND, now, run_id))
            db.execute("INSERT INTO days (source, day, modality, queried_at, found) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT DO UPDATE SET queried_at = excluded.queried_at, found = excluded.found",
                       (source, f"{day:%Y%m%d}", modality, now, len(hits)))

    # --- studies --------------------------------------------------------------------------------------

    def studies(self, source: str | None = None, since: date | None = None, until: date | None = None,
                states: Iterable[BackfillState] | None = None) -> list[BackfillStudy]:
        sql, params = "SELECT * FROM studies WHERE 1 = 1", []
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        if since is not None:
            sql += " AND study_date >= ?"
            params.append(f"{since:%Y%m%d}")
        if until is not None:
            sql += " AND study_date <= ?"
            params.append(f"{until:%Y%m%d}")
        wanted = list(states) if states is not None else None
        if wanted is not None:
            sql += f" AND state IN ({', '.join('?' * len(wanted))})"
            params.extend(wanted)
        return [_study(r) for r in self._query(sql + " ORDER BY study_date, found_at, study_uid", params)]

    def study(self, study_uid: str) -> BackfillStudy | None:
        rows = self._query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        return _study(rows[0]) if rows else None

    def mark_asked(self, study_uid: str, run_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE studies SET state = ?, attempts = attempts + 1, asked_at = ?, run_id = ?, reason = NULL"
                       " WHERE study_uid = ?", (BackfillState.ASKED, time.time(), run_id, study_uid))
            db.execute("UPDATE runs SET asked = asked + 1 WHERE id = ?", (run_id,))

    def mark_done(self, study_uid: str, run_id: int, *, complete: bool, held: int, sub_completed: int | None = None,
                  sub_failed: int | None = None, reason: str | None = None) -> None:
        state = BackfillState.COMPLETE if complete else BackfillState.INCOMPLETE
        with self._transaction() as db:
            db.execute("UPDATE studies SET state = ?, held = ?, sub_completed = COALESCE(?, sub_completed),"
                       " sub_failed = COALESCE(?, sub_failed), reason = ?, completed_at = ?, run_id = ?"
                       " WHERE study_uid = ?",
                       (state, held, sub_completed, sub_failed, reason, time.time() if complete else None, run_id,
                        study_uid))
            db.execute(f"UPDATE runs SET {'completed' if complete else 'incomplete'} ="
                       f" {'completed' if complete else 'incomplete'} + 1 WHERE id = ?", (run_id,))

    def counts(self, source: str | None = None) -> dict[str, int]:
        sql, params = "SELECT state, COUNT(*) AS n FROM studies", []
        if source is not None:
            sql += " WHERE source = ?"
            params.append(source)
        return {str(r["state"]): int(r["n"]) for r in self._query(sql + " GROUP BY state", params)}

    def days_queried(self, source: str | None = None) -> int:
        sql, params = "SELECT COUNT(*) AS n FROM days", []
        if source is not None:
            sql += " WHERE source = ?"
            params.append(source)
        return int(self._query(sql, params)[0]["n"])


def _study(row: sqlite3.Row) -> BackfillStudy:
    return BackfillStudy(study_uid=str(row["study_uid"]), source=str(row["source"]), study_date=str(row["study_date"]),
                         modalities=tuple(m for m in str(row["modalities"]).split("\\") if m),
                         expected=row["expected"], source_ref=row["source_ref"], state=BackfillState(row["state"]),
                         attempts=int(row["attempts"]), held=row["held"], reason=row["reason"])
