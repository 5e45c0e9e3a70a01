"""Where the node keeps its files under ``paths.data_dir``: the on-disk source of truth.

Layout::

    spool/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   objects exactly as received (temp file + atomic rename)
    quarantine/<stamp>-<digest>.dcm (+ .reason.json)      objects refused by the SCP, with why
    outcomes/<StudyUID>/v<version>.json                   what a worker made of one study version (vector or reason)
    results/<StudyUID>/<SOPInstanceUID>.dcm               Structured Reports and their PDF companions we built
    thumbnails/<StudyUID>/<SeriesUID>-<window>-<size>.png  page and companion thumbnails (a cache: safe to delete)
    volumes/<StudyUID>/<SeriesUID>.npz (+ retention.json)  kept HU volumes (retention.keep: volume)
    index/                                                the in-process Qdrant shard (edge backend)
    reports/<StudyUID>.json (+ sr/<StudyUID>/<SOP>.dcm)   radiology reports (text, PHI; owner-only) and their SRs
    state.sqlite3                                         study, instance and delivery state
    secrets/pseudonym.key                                 key of the patient-id pseudonyms (never leaves the node)

In distributed mode this folder is the shared storage that workers mount at the same path.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from workers.dicom_uids import check_uid

@dataclass(frozen=True)
class NodeLayout:
    """Paths of the node's data folder; creating one makes the folders."""

    root: Path

    @classmethod
    def create(cls, root: Path | str) -> "NodeLayout":
        layout = cls(Path(root).resolve())
        for folder in (layout.spool, layout.incoming, layout.quarantine, layout.outcomes, layout.results,
                       layout.index):
            folder.mkdir(parents=True, exist_ok=True)
        layout.reports.mkdir(mode=0o700, parents=True, exist_ok=True)
        return layout

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def incoming(self) -> Path:
        """Objects being received, before they are checked and moved into the spool or quarantine."""
        return self.root / "incoming"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def outcomes(self) -> Path:
        return self.root / "outcomes"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def thumbnails(self) -> Path:
        return self.root / "thumbnails"

    @property
    def state_db(self) -> Path:
        return self.root / "state.sqlite3"

    @property
    def pseudonym_key_file(self) -> Path:
        return self.root / "secrets" / "pseudonym.key"

    def study_spool(self, study_uid: str) -> Path:
        return self.spool / check_uid(study_uid, "StudyInstanceUID")

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (self.study_spool(study_uid) / check_uid(series_uid, "SeriesInstanceUID")
                / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm")

    def study_files(self, study_uid: str) -> list[Path]:
        """Every spooled instance of a study (the spool, not the database, is what workers read)."""
        return sorted(self.study_spool(study_uid).glob("*/*.dcm"))

    def outcome_path(self, study_uid: str, version: int) -> Path:
        return self.outcomes / check_uid(study_uid, "StudyInstanceUID") / f"v{int(version)}.json"

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.results / check_uid(study_uid, "StudyInstanceUID") / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"

    def pseudonym_key(self) -> bytes:
        """The keyed-hash secret for patient pseudonyms, made on first use (readable by the owner only)."""
        path = self.pseudonym_key_file
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                return path.read_bytes()
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
        return path.read_bytes()
