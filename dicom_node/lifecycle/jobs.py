"""The reindex job table and which study versions each bundle's collection holds: ``<data_dir>/reindex.sqlite3``.

The ``medfinder reindex`` command and the running node share this file (SQLite, WAL): the command only inserts a
*requested* job, cancels one, and reads progress; the node — the index's one writer — does the work and moves
jobs on. ``members`` records, per bundle, the result version of every study its collection holds (or why it
holds none), so a reindex interrupted by a node restart continues where it stopped and a study re-sent since
(a newer version) is embedded again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node.store.sqlite_store import SqliteStore

JOBS_FILE = "reindex.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    bundle_id TEXT,
    from_bundle TEXT,
    state TEXT NOT NULL,
    requested_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    total INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    message TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS members (
    bundle_id TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (bundle_id, study_uid)
) WITHOUT ROWID;
"""


class JobKind(StrEnum):
    REINDEX = "reindex"  # embed every indexed study with another bundle, then switch to it
    ROLLBACK = "rollback"  # switch back to the previous collection


class JobState(StrEnum):
    REQUESTED = "requested"  # written by the command; the node picks it up
    RUNNING = "running"  # embedding (reindex) or waiting for the previous collection to catch up (rollback)
    SWITCHING = "switching"  # everything embedded: new studies wait a moment while the last ones finish
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_STATES = (JobState.REQUESTED, JobState.RUNNING, JobState.SWITCHING)


class MemberState(StrEnum):
    EMBEDDED = "embedded"
    NOT_EMBEDDED = "not_embedded"  # the bundle embeds no series of it (its reason kept)
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    bundle_id: str | None
    from_bundle: str | None
    state: JobState
    requested_at: float
    started_at: float | None
    finished_at: float | None
    total: int
    done: int
    failed: int
    message: str | None
    updated_at: float

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


def _job(row: sqlite3.Row) -> Job:
    values: dict[str, Any] = dict(row)
    values["kind"], values["state"] = JobKind(values["kind"]), JobState(values["state"])
    return Job(**values)


class JobStore(SqliteStore):
    """Typed access to ``reindex.sqlite3``; safe to share between threads and between processes."""

    def __init__(self, data_dir: Path | str) -> None:
        super().__init__(Path(data_dir) / JOBS_FILE, SCHEMA)

    # --- jobs ---------------------------------------------------------------------------------------------

    def request(self, kind: JobKind, bundle_id: str | None = None, now: float | None = None) -> Job:
        """A new job for the node; refused (ValueError naming it) while another one is open."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(OPEN_STATES))})"
                             " ORDER BY id LIMIT 1", OPEN_STATES).fetchone()
            if row is not None:
                other = _job(row)
                raise ValueError(f"job {other.id} ({other.kind.value}{' to ' + other.bundle_id if other.bundle_id else ''}"
                                 f") is {other.state.value}; wait for it or cancel it (medfinder reindex cancel)")
            cursor = db.execute("INSERT INTO jobs (kind, bundle_id, state, requested_at, updated_at) VALUES"
                                " (?, ?, ?, ?, ?)", (kind, bundle_id, JobState.REQUESTED, now, now))
            job_id = int(cursor.lastrowid or 0)
        found = self.job(job_id)
        assert found is not None
        return found

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, limit: int = 20) -> list[Job]:
        return [_job(r) for r in self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))]

    def open_job(self) -> Job | None:
        """The one job not finished yet (requested, running or switching), if any."""
        rows = self._query(f"SELECT * FROM jobs WHERE state IN ({', '.join('?' * len(OPEN_STATES))})"
                           " ORDER BY id LIMIT 1", OPEN_STATES)
        return _job(rows[0]) if rows else None

    def move(self, job_id: int, state: JobState, *, message: str | None = None, from_bundle: str | None = None,
             now: float | None = None) -> bool:
        """Move an open job on; False when it is finished already (a cancel raced it)."""
        now = time.time() if now is None else now
        finished = now if state not in OPEN_STATES else None
        with self._transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = ?, message = COALESCE(?, message), from_bundle = COALESCE(?, from_bundle),"
                " started_at = COALESCE(started_at, CASE WHEN ? != ? THEN ? END), finished_at = ?, updated_at = ?"
                f" WHERE id = ? AND state IN ({', '.join('?' * len(OPEN_STATES))})",
                (state, message, from_bundle, state, JobState.REQUESTED, now, finished, now, job_id, *OPEN_STATES),
            ).rowcount == 1

    def progress(self, job_id: int, total: int, done: int, failed: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE jobs SET total = ?, done = ?, failed = ?, updated_at = ? WHERE id = ?",
                       (total, done, failed, now, job_id))

    # --- members --------------------------------------------------------------------------------------------

    def members(self, bundle_id: str) -> dict[str, tuple[int, MemberState]]:
        """study UID -> (version, state) of every study recorded for ``bundle_id``'s collection."""
        rows = self._query("SELECT study_uid, version, state FROM members WHERE bundle_id = ?", (bundle_id,))
        return {str(r["study_uid"]): (int(r["version"]), MemberState(r["state"])) for r in rows}

    def record_member(self, bundle_id: str, study_uid: str, version: int, state: MemberState,
                      reason: str | None = None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("INSERT INTO members (bundle_id, study_uid, version, state, reason, recorded_at) VALUES"
                       " (?, ?, ?, ?, ?, ?) ON CONFLICT(bundle_id, study_uid) DO UPDATE SET version = excluded.version,"
                       " state = excluded.state, reason = excluded.reason, recorded_at = excluded.recorded_at",
                       (bundle_id, study_uid, version, state, reason, now))

    def record_indexed(self, bundle_id: str, versions: Iterable[tuple[str, int]], now: float | None = None) -> None:
        """Record studies the pipeline itself indexed into ``bundle_id``'s collection (while it was active), without
        overwriting what a reindex recorded for the same or a newer version."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.executemany("INSERT INTO members (bundle_id, study_uid, version, state, reason, recorded_at) VALUES"
                           " (?, ?, ?, ?, NULL, ?) ON CONFLICT(bundle_id, study_uid) DO UPDATE SET"
                           " version = excluded.version, state = excluded.state, reason = NULL,"
                           " recorded_at = excluded.recorded_at WHERE members.version < excluded.version",
                           [(bundle_id, uid, version, MemberState.EMBEDDED, now) for uid, version in versions])
