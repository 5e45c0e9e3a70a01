"""The on-disk hand-off between the node and ``embed_study``: a study folder in, an outcome file out.

The node sends an :class:`EmbedRequest` (in-process, or as JSON in a Celery message); the worker answers with an
:class:`EmbedOutcome` written atomically to the path the request names. The node polls for that file: queues
only notify, so a lost message costs a re-dispatch, and re-running a request rewrites the same file. Both types
are defined here, with the outcome's reader and writer, so neither side reads the other's dicts by string keys.
"""

from __future__ import annotations

import json
import socket
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model_export.atomic_files import write_atomic


class EmbedRequest(BaseModel):
    """One study version to embed: which bundle, where its spooled series are, where the outcome goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_uid: str
    version: int
    bundle_id: str
    study_folder: Path  # <spool>/<StudyUID>: one sub-folder per series
    outcome_path: Path
    pseudonym_key_file: Path  # the key of the patient pseudonyms (never sent itself)
    # <data_dir>/volumes/<StudyUID>: kept volumes (retention.keep volume), read when the spool was deleted and
    # written by the worker when it keeps one; None = beside the spool (workers.volume_store.default_volume_folder).
    volume_folder: Path | None = None


class EmbedStatus(StrEnum):
    EMBEDDED = "embedded"  # a vector and its payload
    NOT_EMBEDDED = "not_embedded"  # no series qualifies: the reason and each series' verdict
    FAILED = "failed"  # the chosen series could not be read or embedded, or the worker broke: the error


class StudyPayload(BaseModel):
    """The searchable metadata stored with a study's vector: UIDs, header fields, a patient pseudonym.

    Never a name or a raw patient id: the pseudonym is a keyed hash that only matches equal ids.
    """

    model_config = ConfigDict(extra="forbid")

    study_uid: str
    series_uid: str
    accession: str | None = None
    study_date: str | None = None
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    institution: str | None = None
    patient_pseudonym: str | None = None
    sex: str | None = None  # PatientSex: M, F or O
    age_band: str | None = None  # ten-year band of the age at the study: "40-49", "90+"
    study_day: int | None = None  # StudyDate as YYYYMMDD, for date-range filters
    has_report: bool = False  # whether the point carries a `report` vector (set by the node, which owns reports)
    bundle_id: str
    result_version: int
    n_slices: int


class EmbedOutcome(BaseModel):
    """What a worker made of one study version; the only thing it hands back."""

    model_config = ConfigDict(extra="ignore")

    study_uid: str
    version: int
    bundle_id: str
    status: EmbedStatus
    worker: str = Field(default_factory=socket.gethostname)
    finished_at: float = Field(default_factory=time.time)
    reason: str | None = None
    series_uid: str | None = None
    selection: dict[str, Any] | None = None  # workers.series_selection.SeriesChoice.as_dict()
    vector: list[float] | None = None
    payload: StudyPayload | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def for_request(cls, request: EmbedRequest, status: EmbedStatus, **fields: Any) -> "EmbedOutcome":
        return cls(study_uid=request.study_uid, version=request.version, bundle_id=request.bundle_id, status=status,
                   **fields)


def write_outcome(path: Path, outcome: EmbedOutcome) -> None:
    """Write the outcome atomically (the node never reads half a file)."""
    write_atomic(path, outcome.model_dump_json().encode("utf-8"))


def read_outcome(path: Path) -> EmbedOutcome | None:
    """A written outcome, or None while it does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return EmbedOutcome.model_validate(json.loads(text))
