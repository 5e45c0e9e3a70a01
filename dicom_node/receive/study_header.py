"""Study attributes from a header the ingest step already parsed, and their one-time backfill at start.

The C-STORE handler calls :func:`study_attributes_from_header` on the dataset it has just validated (no extra
file read); the state store writes the result only when the instance's series is new. Data folders made before
the store kept attributes get them once, from one spooled header per series (:func:`backfill_study_attributes`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.store.state import StateStore, StudyAttributes

logger = logging.getLogger(__name__)

# StudyAttributes field -> DICOM keyword (all study-level text attributes the header gives).
HEADER_KEYWORDS = {
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_description": "StudyDescription",
    "study_id": "StudyID",
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "patient_sex": "PatientSex",
    "patient_birth_date": "PatientBirthDate",
    "referring_physician_name": "ReferringPhysicianName",
}
_BACKFILL_TAGS = ["Modality", *HEADER_KEYWORDS.values(), "SpecificCharacterSet"]


def _text(dataset: Dataset, keyword: str) -> str | None:
    """One header value as text; None when absent, empty or undecodable (never fails the caller)."""
    try:
        value = dataset.get(keyword)
        if value is None:
            return None
        text = str(value).strip().rstrip("\x00").strip()  # str() decodes too (a person name's character set)
    except Exception:  # noqa: BLE001 - a bad value in an optional attribute must not refuse the instance
        return None
    return text or None


def study_attributes_from_header(dataset: Dataset, study_uid: str) -> tuple[StudyAttributes, str | None]:
    """(the study's attributes as this header gives them, this instance's series modality)."""
    values = {field: _text(dataset, keyword) for field, keyword in HEADER_KEYWORDS.items()}
    return StudyAttributes(study_uid=study_uid, **values), _text(dataset, "Modality")


def backfill_study_attributes(store: StateStore) -> int:
    """Give studies recorded without attributes theirs, reading one spooled header per series; returns how many
    studies got them. Runs at start; a study whose files cannot be read is skipped (and tried again next start)."""
    filled = 0
    for study_uid in store.studies_without_attributes():
        for series_uid, path in store.one_instance_per_series(study_uid):
            header = _read_header(path)
            if header is None:
                continue
            attributes, modality = study_attributes_from_header(header, study_uid)
            store.note_series(study_uid, series_uid, attributes, modality)
        filled += store.study_attributes(study_uid) is not None
    if filled:
        logger.info("event=study_attributes_backfilled studies=%d", filled)
    return filled


def _read_header(path: Path) -> Dataset | None:
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=_BACKFILL_TAGS)
    except Exception as error:  # noqa: BLE001 - a damaged spool file must not stop the node from starting
        logger.warning("event=study_attributes_unreadable path=%s error=%s", path.name, type(error).__name__)
        return None
