"""Radiology reports the node holds: ``<data_dir>/reports/<StudyUID>.json``, one per study, the latest wins.

A report is PHI: its text lives only here (never in the index payload, never in a log), in files readable by the
node's user alone (0600, folder 0700), written atomically so a reader sees the old report or the new one. Each
record keeps where the text came from (``dicom-sr`` or ``rest``), when, a SHA-256 of the text (to tell a changed
report from a re-sent one), and the report's embedding with the bundle that made it, so the pipeline can add the
``report`` vector when a study's images are indexed after its report arrived. Received SR objects are kept as
received beside them, under ``sr/<StudyUID>/<SOPInstanceUID>.dcm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from workers.dicom_uids import InvalidUIDError, check_uid
from model_export.atomic_files import atomic_path

ReportSource = Literal["dicom-sr", "rest"]
FILE_MODE = 0o600
FOLDER_MODE = 0o700


class ReportRecord(BaseModel):
    """One study's current report."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    study_uid: str
    text: str
    source: ReportSource
    received_at: float
    sha256: str  # of the UTF-8 text
    sop_instance_uid: str | None = None  # the SR it was read from (dicom-sr)
    vector_bundle_id: str | None = None
    vector: list[float] | None = None  # the text's embedding by ``vector_bundle_id``

    def vector_of(self, bundle_id: str) -> list[float] | None:
        """The stored embedding when it was made by ``bundle_id`` (else it must be recomputed)."""
        return self.vector if self.vector is not None and self.vector_bundle_id == bundle_id else None


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically into a file only the owner can read."""
    path.parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)


class ReportStore:
    """The report files under one folder; safe to share between the node's threads."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, study_uid: str) -> Path:
        return self.root / f"{check_uid(study_uid, 'StudyInstanceUID')}.json"

    def sr_path(self, study_uid: str, sop_uid: str) -> Path:
        return (self.root / "sr" / check_uid(study_uid, "StudyInstanceUID")
                / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def save_sr(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Keep a received report SR byte for byte (owner-only)."""
        path = self.sr_path(study_uid, sop_uid)
        write_private(path, data)
        return path

    def put(self, study_uid: str, text: str, source: ReportSource, *, vector: list[float] | None = None,
            bundle_id: str | None = None, sop_instance_uid: str | None = None,
            received_at: float | None = None) -> ReportRecord:
        """Store (or replace) a study's report; returns the record written."""
        record = ReportRecord(study_uid=check_uid(study_uid, "StudyInstanceUID"), text=text, source=source,
                              received_at=time.time() if received_at is None else received_at,
                              sha256=text_digest(text), sop_instance_uid=sop_instance_uid,
                              vector_bundle_id=bundle_id if vector is not None else None, vector=vector)
        with self._lock:
            self._write(record)
        return record

    def set_vector(self, record: ReportRecord, bundle_id: str, vector: list[float]) -> ReportRecord:
        """Add the embedding of ``record``'s text, unless the report was replaced meanwhile."""
        updated = record.model_copy(update={"vector_bundle_id": bundle_id, "vector": vector})
        with self._lock:
            current = self.get(record.study_uid)
            if current is None or current.sha256 != record.sha256 or current.received_at != record.received_at:
                return current or updated
            self._write(updated)
        return updated

    def get(self, study_uid: str) -> ReportRecord | None:
        try:
            data = self.path(study_uid).read_bytes()
        except (FileNotFoundError, InvalidUIDError):
            return None
        return ReportRecord.model_validate(json.loads(data))

    def study_uids(self) -> list[str]:
        """Studies with a report (file names, nothing parsed)."""
        return sorted(p.stem for p in self.root.glob("*.json") if not p.name.startswith("."))

    def _write(self, record: ReportRecord) -> None:
        write_private(self.path(record.study_uid), record.model_dump_json().encode("utf-8"))
