"""The node's state store (SQLite): studies, their instances, their DICOM attributes (for listing and C-FIND) and
the deliveries of their results.

Together with the spool this is the source of truth; queues only carry notifications. Every write is one
short transaction, so a node killed at any point restarts with each study in a state it can resume from:

    receiving --quiet timer--> queued --outcome: vector upserted--> indexed --SR built--> reported
        ^                        |                                     |                     |
        +---- a new instance ----+-------------------------------------+---------------------+  (a new result version)
                                 +--> not_embedded / failed (reason kept)

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed transaction survives the process being
killed (not necessarily a power cut, which the spool's page cache would not survive either). One
connection, guarded by a lock, serves the node's threads; other processes (``medfinder studies``) read
concurrently.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicom_node.store.sqlite_store import SqliteStore


class StudyState(StrEnum):
    RECEIVING = "receiving"  # instances arriving; waits for the quiet timer
    QUEUED = "queued"  # handed to a worker for one result version
    INDEXED = "indexed"  # vector in the index; the SR waits for studies that completed alongside it
    REPORTED = "reported"  # indexed, SR built and deliveries created
    BACKFILLED = "backfilled"  # indexed from the archive; no SR sent (its reports are suppressed)
    NOT_EMBEDDED = "not_embedded"  # stored, but no series qualifies (reason kept)
    FAILED = "failed"  # the worker or the indexer failed (reason kept)


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # attempts exhausted: an operator lists and retries these


SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    calling_ae TEXT,
    peer_ip TEXT,
    quiet_seconds REAL NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    dispatched_at REAL,
    bundle_id TEXT,
    series_uid TEXT,
    selection TEXT,
    reason TEXT,
    point_id TEXT,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances(study_uid);
-- Study-level attributes for listing and ordinary C-FIND: written once, from the first instance's header.
CREATE TABLE IF NOT EXISTS study_attributes (
    study_uid TEXT PRIMARY KEY,
    study_date TEXT,
    study_time TEXT,
    accession_number TEXT,
    study_description TEXT,
    study_id TEXT,
    modalities TEXT NOT NULL DEFAULT '',
    n_series INTEGER NOT NULL DEFAULT 0,
    patient_name TEXT,
    patient_id TEXT,
    patient_sex TEXT,
    patient_birth_date TEXT,
    referring_physician_name TEXT,
    recorded_at REAL NOT NULL
);
-- One row per series: receiving probes it once per instance; only a series not yet here writes attributes.
CREATE TABLE IF NOT EXISTS study_series (
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    modality TEXT,
    PRIMARY KEY (study_uid, series_uid)
) WITHOUT ROWID;
-- Studies indexed without sending an SR (a backfill without --report): the pipeline checks before reporting.
CREATE TABLE IF NOT EXISTS reports_suppressed (
    study_uid TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    recorded_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    ae_title TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_error TEXT,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    created_at REAL NOT NULL,
    UNIQUE (sop_uid, destination)
);
"""


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    state: StudyState
    calling_ae: str | None
    peer_ip: str | None
    quiet_seconds: float
    first_received: float
    last_received: float
    n_instances: int
    version: int
    dispatched_at: float | None
    bundle_id: str | None
    series_uid: str | None
    selection: str | None
    reason: str | None
    point_id: str | None
    updated_at: float


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    study_uid: str
    version: int
    sop_uid: str
    path: str
    destination: str
    ae_title: str
    host: str
    port: int
    state: DeliveryState
    attempts: int
    last_status: str | None
    last_error: str | None
    next_attempt_at: float
    delivered_at: float | None
    created_at: float


@dataclass(frozen=True)
class InstanceRecord:
    """What the C-STORE handler knows about one stored object."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int


@dataclass(frozen=True)
class StudyAttributes:
    """A study's DICOM attributes as its first instance's header gave them (PHI: never logged).

    ``modalities_in_study`` grows as series of new modalities arrive (arrival order); the two counts are what the
    node holds. Empty header values are ``None``.
    """

    study_uid: str
    study_date: str | None = None  # YYYYMMDD
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    study_id: str | None = None
    modalities_in_study: tuple[str, ...] = ()
    patient_name: str | None = None
    patient_id: str | None = None
    patient_sex: str | None = None
    patient_birth_date: str | None = None
    referring_physician_name: str | None = None
    number_of_series: int = 0
    number_of_instances: int = 0


# What an instance's header says about its study and its series' modality (called only for a new series).
SeriesHeader = Callable[[], tuple[StudyAttributes, str | None]]

_ATTRIBUTE_COLUMNS = ("study_date", "study_time", "accession_number", "study_description", "study_id",
                      "patient_name", "patient_id", "patient_sex", "patient_birth_date", "referring_physician_name")


class StateStore(SqliteStore):
    """Typed access to ``state.sqlite3``; safe to share between the node's threads."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(path, SCHEMA)

    # --- receiving ---------------------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, calling_ae: str | None, peer_ip: str | None,
                        quiet_seconds: float, now: float | None = None, *, header: SeriesHeader | None = None) -> bool:
        """Note a stored instance; returns False when its SOP Instance UID was already known (a re-send).

        A new instance of a study that was already processed puts the study back to ``receiving``, so the
        quiet timer fires again and a new result version is made. ``header`` gives what the instance's header
        says about its study and its series' modality; it is called, and written, only when the series is new
        (otherwise the cost is one indexed probe, in the same transaction).
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path, size,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sop_uid) DO NOTHING",
                (record.sop_uid, record.study_uid, record.series_uid, record.sop_class_uid, record.transfer_syntax,
                 str(record.path), record.size, now),
            ).rowcount == 1
            if not inserted:
                return False
            db.execute(
                "INSERT INTO studies (study_uid, state, calling_ae, peer_ip, quiet_seconds, first_received,"
                " last_received, n_instances, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)"
                " ON CONFLICT(study_uid) DO UPDATE SET state = ?, calling_ae = excluded.calling_ae,"
                " peer_ip = excluded.peer_ip, quiet_seconds = excluded.quiet_seconds,"
                " last_received = excluded.last_received, n_instances = n_instances + 1,"
                " updated_at = excluded.updated_at",
                (record.study_uid, StudyState.RECEIVING, calling_ae, peer_ip, quiet_seconds, now, now, now,
                 StudyState.RECEIVING),
            )
            if header is not None and not _known_series(db, record.study_uid, record.series_uid):
                study, modality = header()
                _note_series(db, record.study_uid, record.series_uid, study, modality, now)
            return True

    def known_instance(self, sop_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def instances(self, study_uid: str) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM instances WHERE study_uid = ? ORDER BY series_uid, sop_uid", (study_uid,))

    # --- study attributes ---------------------------------------------------------------------------

    def note_series(self, study_uid: str, series_uid: str, study: StudyAttributes, modality: str | None,
                    now: float | None = None) -> bool:
        """Record a series' header outside of receiving (the backfill); True when the series was new."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return _note_series(db, study_uid, series_uid, study, modality, now)

    def study_attributes(self, study_uid: str) -> StudyAttributes | None:
        rows = self._query(_ATTRIBUTES_SELECT + " WHERE a.study_uid = ?", (study_uid,))
        return _attributes(rows[0]) if rows else None

    def all_study_attributes(self) -> list[StudyAttributes]:
        """Every study the node holds that has attributes, oldest arrival first."""
        return [_attributes(r) for r in self._query(_ATTRIBUTES_SELECT + " ORDER BY s.first_received, a.study_uid")]

    def studies_without_attributes(self) -> list[str]:
        rows = self._query("SELECT study_uid FROM studies WHERE study_uid NOT IN (SELECT study_uid FROM"
                           " study_attributes) ORDER BY first_received")
        return [str(r["study_uid"]) for r in rows]

    def one_instance_per_series(self, study_uid: str) -> list[tuple[str, Path]]:
        """(series UID, path of one of its instances) for each series of a study (the backfill reads these)."""
        rows = self._query("SELECT series_uid, MIN(path) AS path FROM instances WHERE study_uid = ?"
                           " GROUP BY series_uid ORDER BY MIN(received_at)", (study_uid,))
        return [(str(r["series_uid"]), Path(r["path"])) for r in rows]

    # --- assembling and processing -----------------------------------------------------------------

    def due_studies(self, now: float, in_flight: set[str], max_open_wait_s: float) -> list[StudyRow]:
        """Studies whose quiet timer has run out and that no open association is still sending."""
        rows = self._query("SELECT * FROM studies WHERE state = ? AND last_received + quiet_seconds <= ?",
                           (StudyState.RECEIVING, now))
        return [s for s in map(_study, rows)
                if s.study_uid not in in_flight or now - s.last_received >= max_open_wait_s]

    def mark_queued(self, study_uid: str, bundle_id: str, now: float | None = None) -> int | None:
        """``receiving`` -> ``queued`` with the next result version; None if the study moved on meanwhile."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT state, version FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None or row["state"] != StudyState.RECEIVING:
                return None
            version = int(row["version"]) + 1
            db.execute("UPDATE studies SET state = ?, version = ?, dispatched_at = ?, bundle_id = ?, reason = NULL,"
                       " updated_at = ? WHERE study_uid = ?",
                       (StudyState.QUEUED, version, now, bundle_id, now, study_uid))
            return version

    def touch_dispatch(self, study_uid: str, now: float | None = None) -> None:
        """Record a re-dispatch of the current version (its outcome never appeared)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute("UPDATE studies SET dispatched_at = ?, updated_at = ? WHERE study_uid = ?",
                       (now, now, study_uid))

    def queued_studies(self) -> list[StudyRow]:
        return [_study(r) for r in self._query("SELECT * FROM studies WHERE state = ?", (StudyState.QUEUED,))]

    def finish(self, study_uid: str, version: int, state: StudyState, *, reason: str | None = None,
               series_uid: str | None = None, selection: str | None = None, point_id: str | None = None,
               now: float | None = None) -> bool:
        """Move result ``version`` of a queued or indexed study on to ``state``.

        False (nothing written) when a newer instance has superseded that version meanwhile. ``None`` fields keep
        what earlier steps recorded.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE studies SET state = ?, reason = ?, series_uid = COALESCE(?, series_uid),"
                " selection = COALESCE(?, selection), point_id = COALESCE(?, point_id), updated_at = ?"
                " WHERE study_uid = ? AND version = ? AND state IN (?, ?)",
                (state, reason, series_uid, selection, point_id, now, study_uid, version, StudyState.QUEUED,
                 StudyState.INDEXED),
            ).rowcount
            return changed == 1

    def unfinished_studies(self) -> list[StudyRow]:
        """Studies still receiving or being embedded (not yet in the index for their current version)."""
        rows = self._query("SELECT * FROM studies WHERE state IN (?, ?)", (StudyState.RECEIVING, StudyState.QUEUED))
        return [_study(r) for r in rows]

    def suppress_reports(self, study_uids: Iterable[str], source: str, now: float | None = None) -> None:
        """Index these studies without sending an SR (recorded just before they are fetched: the pipeline checks
        it). Recording again restarts the window of :meth:`reports_suppressed`."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.executemany("INSERT INTO reports_suppressed (study_uid, source, recorded_at) VALUES (?, ?, ?)"
                           " ON CONFLICT(study_uid) DO UPDATE SET source = excluded.source,"
                           " recorded_at = excluded.recorded_at", [(uid, source, now) for uid in study_uids])

    def reports_suppressed(self, study: StudyRow, window_s: float) -> bool:
        """Whether this study's SR is suppressed: it was recorded, and its last instance arrived within
        ``window_s`` of the recording (a later live send of the same study gets its SR as usual)."""
        rows = self._query("SELECT recorded_at FROM reports_suppressed WHERE study_uid = ?", (study.study_uid,))
        return bool(rows) and study.last_received <= float(rows[0]["recorded_at"]) + window_s

    def indexed_versions(self, states: Iterable[StudyState]) -> dict[str, int]:
        """Study UID -> result version of every study in ``states`` that has a point in the index (two columns,
        no sort: the lifecycle reads this on every pass while a collection follows the active one)."""
        wanted = tuple(states)
        marks = ", ".join("?" for _ in wanted)
        rows = self._query(f"SELECT study_uid, version FROM studies WHERE point_id IS NOT NULL AND state IN ({marks})",
                           wanted)
        return {str(row["study_uid"]): int(row["version"]) for row in rows}

    def indexed_studies(self) -> list[StudyRow]:
        rows = self._query("SELECT * FROM studies WHERE state = ? ORDER BY dispatched_at", (StudyState.INDEXED,))
        return [_study(r) for r in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        return _study(rows[0]) if rows else None

    def studies(self) -> list[StudyRow]:
        return [_study(r) for r in self._query("SELECT * FROM studies ORDER BY first_received")]

    # --- deliveries -----------------------------------------------------------------------------------

    def add_delivery(self, study_uid: str, version: int, sop_uid: str, path: Path, destination: str,
                     ae_title: str, host: str, port: int, now: float | None = None) -> None:
        """Queue one SR for one destination; the same SR and destination twice is one delivery."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "INSERT INTO deliveries (study_uid, version, sop_uid, path, destination, ae_title, host, port, state,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(sop_uid, destination) DO NOTHING",
                (study_uid, version, sop_uid, str(path), destination, ae_title, host, port, DeliveryState.PENDING,
                 now, now),
            )

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        rows = self._query("SELECT * FROM deliveries WHERE state = ? AND next_attempt_at <= ? ORDER BY id",
                           (DeliveryState.PENDING, now))
        return [_delivery(r) for r in rows]

    def delivery_attempted(self, delivery_id: int, *, delivered: bool, status: str | None, error: str | None,
                           next_attempt_at: float | None, now: float | None = None) -> DeliveryState:
        """Record one attempt; ``next_attempt_at`` None on a failure means the delivery is dead."""
        now = time.time() if now is None else now
        if delivered:
            state = DeliveryState.DELIVERED
        else:
            state = DeliveryState.PENDING if next_attempt_at is not None else DeliveryState.DEAD
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
                " next_attempt_at = ?, delivered_at = ? WHERE id = ?",
                (state, status, error, next_attempt_at if next_attempt_at is not None else now,
                 now if delivered else None, delivery_id),
            )
        return state

    def deliveries(self, study_uid: str | None = None, state: DeliveryState | None = None) -> list[DeliveryRow]:
        sql, params = "SELECT * FROM deliveries WHERE 1 = 1", []
        if study_uid is not None:
            sql += " AND study_uid = ?"
            params.append(study_uid)
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        return [_delivery(r) for r in self._query(sql + " ORDER BY id", params)]

    def retry_delivery(self, delivery_id: int, now: float | None = None) -> bool:
        """A dead delivery back to pending with a fresh attempt budget (the operator's retry)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return db.execute("UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ? WHERE id = ?"
                              " AND state = ?", (DeliveryState.PENDING, now, delivery_id, DeliveryState.DEAD)
                              ).rowcount == 1


_ATTRIBUTES_SELECT = ("SELECT a.*, COALESCE(s.n_instances, 0) AS n_instances FROM study_attributes a"
                      " LEFT JOIN studies s ON s.study_uid = a.study_uid")


def _known_series(db: sqlite3.Connection, study_uid: str, series_uid: str) -> bool:
    return db.execute("SELECT 1 FROM study_series WHERE study_uid = ? AND series_uid = ?",
                      (study_uid, series_uid)).fetchone() is not None


def _note_series(db: sqlite3.Connection, study_uid: str, series_uid: str, study: StudyAttributes,
                 modality: str | None, now: float) -> bool:
    """Insert the series; when it is new, write the study's attributes (first series only) and add its
    modality to ModalitiesInStudy. True when the series was new."""
    modality = (modality or "").strip() or None
    new_series = db.execute("INSERT INTO study_series (study_uid, series_uid, modality) VALUES (?, ?, ?)"
                            " ON CONFLICT DO NOTHING", (study_uid, series_uid, modality)).rowcount == 1
    if not new_series:
        return False
    values = [getattr(study, column) for column in _ATTRIBUTE_COLUMNS]
    db.execute(f"INSERT INTO study_attributes (study_uid, {', '.join(_ATTRIBUTE_COLUMNS)}, recorded_at)"
               f" VALUES ({', '.join('?' * (len(_ATTRIBUTE_COLUMNS) + 2))}) ON CONFLICT(study_uid) DO NOTHING",
               (study_uid, *values, now))
    row = db.execute("SELECT modalities FROM study_attributes WHERE study_uid = ?", (study_uid,)).fetchone()
    modalities = [m for m in str(row["modalities"]).split("\\") if m]
    if modality is not None and modality not in modalities:
        modalities.append(modality)
    db.execute("UPDATE study_attributes SET modalities = ?, n_series = n_series + 1 WHERE study_uid = ?",
               ("\\".join(modalities), study_uid))
    return True


def _attributes(row: sqlite3.Row) -> StudyAttributes:
    return StudyAttributes(study_uid=str(row["study_uid"]), **{c: row[c] for c in _ATTRIBUTE_COLUMNS},
                           modalities_in_study=tuple(m for m in str(row["modalities"]).split("\\") if m),
                           number_of_series=int(row["n_series"]), number_of_instances=int(row["n_instances"]))


def _study(row: sqlite3.Row) -> StudyRow:
    values = dict(row)
    values["state"] = StudyState(values["state"])
    return StudyRow(**values)


def _delivery(row: sqlite3.Row) -> DeliveryRow:
    values = dict(row)
    values["state"] = DeliveryState(values["state"])
    return DeliveryRow(**values)
