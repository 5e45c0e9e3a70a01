"""The ``embed_study`` task body: one :class:`~workers.handoff.EmbedRequest` -> an outcome file.

It runs unchanged in a thread of the node (embedded mode) and in a Celery worker process on a GPU machine
(distributed mode); both read what the node kept of the study — the spooled DICOM, else the kept volume of its
embedded series (``retention.keep: volume``, :mod:`workers.volume_store`) — and write the outcome where the request
says (the node's data folder, shared storage in distributed mode). Only series of a body region the bundle was
made for are embedded (``model_export.domain``; ``selection.domain_check``). The outcome — written atomically — is the worker's only output:
the node, which owns the index and the state store, picks it up, upserts the vector and reports. Re-running a
request rewrites the same file, so redelivered or re-dispatched tasks are harmless.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import pydicom

from config import Settings
from model_export.bundle_manifest import BundleManifest, read_manifest
from model_export.domain import BundleDomain, bundle_domain
from model_export.preprocessing import Volume, VolumeError, load_dicom_series, preprocess_volume
from model_export.registry import find_bundle
from model_export.runtime import ModelBundle, load_bundle
from workers.handoff import EmbedOutcome, EmbedRequest, EmbedStatus, StudyPayload, write_outcome
from workers.series_selection import SeriesSummary, choose_series, read_first_header, summarise_series
from workers.volume_store import (
    default_volume_folder,
    kept_summaries,
    load_kept_volume,
    merge_candidates,
    read_retention_record,
    save_kept_volume,
)

logger = logging.getLogger(__name__)

# Header fields copied into the index payload (no names, no raw patient id).
PAYLOAD_FIELDS = {
    "accession": "AccessionNumber",
    "study_date": "StudyDate",
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "study_description": "StudyDescription",
    "series_description": "SeriesDescription",
    "institution": "InstitutionName",
}

_bundles: dict[str, ModelBundle] = {}
_bundles_lock = threading.Lock()
_manifests: dict[str, BundleManifest] = {}


def bundle_for(settings: Settings, bundle_id: str) -> ModelBundle:
    """The loaded bundle ``bundle_id``, one ONNX session set per process (created on first use)."""
    with _bundles_lock:
        if bundle_id not in _bundles:
            started = time.perf_counter()
            _bundles[bundle_id] = load_bundle(find_bundle(settings, bundle_id), providers=settings.workers.providers,
                                              threads=settings.workers.onnx_threads)
            logger.info("event=bundle_loaded bundle_id=%s providers=%s seconds=%.2f", bundle_id,
                        ",".join(_bundles[bundle_id].providers["image_encoder"]), time.perf_counter() - started)
        return _bundles[bundle_id]


def manifest_for(settings: Settings, bundle_id: str) -> BundleManifest:
    """The manifest of bundle ``bundle_id`` (read once per process; no ONNX session needed to route a study)."""
    with _bundles_lock:
        if bundle_id in _bundles:
            return _bundles[bundle_id].manifest
        if bundle_id not in _manifests:
            _manifests[bundle_id] = read_manifest(find_bundle(settings, bundle_id))
        return _manifests[bundle_id]


def domain_for(settings: Settings, bundle_id: str) -> BundleDomain | None:
    """The domain studies are routed by: the bundle's, unless ``selection.domain_check`` is off or it has none."""
    if not settings.selection.domain_check:
        return None
    return bundle_domain(manifest_for(settings, bundle_id), settings.selection.unknown_region)


def patient_pseudonym(key: bytes, patient_id: str, issuer: str = "") -> str:
    """A keyed hash of the patient id (HMAC-SHA256): equal ids match, the id itself never leaves the node."""
    return hmac.new(key, f"{issuer}|{patient_id}".encode("utf-8"), hashlib.sha256).hexdigest()[:32]


_AGE = re.compile(r"^(\d{1,3})([DWMY])$")  # PatientAge (AS): 045Y, 006M, 003W, 010D
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 30.4375, "Y": 365.25}
OLDEST_BAND = 90  # "90+": finer bands of the very old identify people (HIPAA safe harbour groups 90 and over)


def _dicom_date(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def patient_sex(header: pydicom.Dataset) -> str | None:
    """PatientSex as M, F or O; None when absent or anything else."""
    value = str(header.get("PatientSex", "") or "").strip().upper()
    return value if value in ("M", "F", "O") else None


def age_years(header: pydicom.Dataset) -> int | None:
    """Age at the study in whole years: PatientAge ("045Y", "006M"), else PatientBirthDate to StudyDate."""
    match = _AGE.match(str(header.get("PatientAge", "") or "").strip().upper())
    if match:
        return int(int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] // 365.25)
    born, studied = _dicom_date(header.get("PatientBirthDate")), _dicom_date(header.get("StudyDate"))
    if born is None or studied is None or studied < born:
        return None
    return studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))


def age_band(years: int | None) -> str | None:
    """Ten-year band of an age: 45 -> "40-49", 7 -> "0-9", 93 -> "90+"; None when unknown or implausible."""
    if years is None or not 0 <= years <= 150:
        return None
    if years >= OLDEST_BAND:
        return f"{OLDEST_BAND}+"
    low = years // 10 * 10
    return f"{low}-{low + 9}"


def study_day(header: pydicom.Dataset) -> int | None:
    """StudyDate as the integer YYYYMMDD (for date-range filters); None when absent or not a real date."""
    day = _dicom_date(header.get("StudyDate"))
    return int(day.strftime("%Y%m%d")) if day is not None else None


def study_payload(header: pydicom.Dataset, key: bytes, *, bundle_id: str, version: int,
                  n_slices: int) -> StudyPayload:
    """The searchable metadata of one study, from one header of its chosen series."""
    fields: dict[str, Any] = {name: (str(value) if (value := header.get(keyword)) not in (None, "") else None)
                              for name, keyword in PAYLOAD_FIELDS.items()}
    patient_id = str(header.get("PatientID", "") or "")
    pseudonym = (patient_pseudonym(key, patient_id, str(header.get("IssuerOfPatientID", "") or ""))
                 if patient_id else None)
    return StudyPayload(study_uid=str(header.get("StudyInstanceUID", "")),
                        series_uid=str(header.get("SeriesInstanceUID", "")), patient_pseudonym=pseudonym,
                        sex=patient_sex(header), age_band=age_band(age_years(header)), study_day=study_day(header),
                        bundle_id=bundle_id, result_version=version, n_slices=n_slices, **fields)


def nothing_kept_reason(settings: Settings, request: EmbedRequest, folder: Path) -> str:
    """Why there is nothing to embed, and where the study can come from again."""
    record = read_retention_record(folder)
    what = (f"retention.keep={record.get('keep')} deleted its spooled DICOM after version {record.get('version')}"
            if record else "no spooled instance and no kept volume")
    source = settings.retention.refetch_from
    where = f"re-fetch it from {source} (retention.refetch_from)" if source else \
        "re-fetch it from the PACS (retention.refetch_from is not set) or send it again"
    return f"nothing kept of study {request.study_uid}: {what}; {where}"


def load_candidate(summary: SeriesSummary) -> tuple[Volume, pydicom.Dataset]:
    """The chosen series' volume and header: decoded from the spool, or read from its kept volume."""
    if summary.kept is not None:
        kept = load_kept_volume(summary.kept)
        return kept.volume, kept.header
    return load_dicom_series(summary.folder), read_first_header(summary.folder)


def compute_outcome(settings: Settings, request: EmbedRequest) -> EmbedOutcome:
    """Select, load, preprocess and embed; never raises for bad studies (the outcome says what went wrong)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    folder = request.volume_folder or default_volume_folder(request.study_folder)
    spooled = summarise_series(sorted(request.study_folder.glob("*/*.dcm")))
    candidates, notes = merge_candidates(spooled, kept_summaries(folder))
    if not candidates:
        return EmbedOutcome.for_request(request, EmbedStatus.FAILED, reason=nothing_kept_reason(settings, request,
                                                                                                folder),
                                        timings=timings)
    choice = choose_series(candidates, settings.selection, domain_for(settings, request.bundle_id))
    timings["select_s"] = time.perf_counter() - started
    selection = {**choice.as_dict(), **({"notes": notes} if notes else {})}
    if choice.series_uid is None or choice.summary is None:
        reason = choice.reason
        if read_retention_record(folder) is not None and not any(c.kept for c in candidates):
            # later instances alone: the earlier ones were deleted with nothing kept
            reason += f"; {nothing_kept_reason(settings, request, folder)}"
        return EmbedOutcome.for_request(request, EmbedStatus.NOT_EMBEDDED, reason=reason,
                                        selection=selection, timings=timings)
    try:
        bundle = bundle_for(settings, request.bundle_id)
        step = time.perf_counter()
        volume, header = load_candidate(choice.summary)
        timings["decode_s"] = time.perf_counter() - step
        step = time.perf_counter()
        array = preprocess_volume(volume, bundle.preprocessing)
        timings["preprocess_s"] = time.perf_counter() - step
        step = time.perf_counter()
        vector = bundle.embed_volume(array)
        timings["embed_s"] = time.perf_counter() - step
    except VolumeError as error:
        return EmbedOutcome.for_request(request, EmbedStatus.FAILED, reason=f"series {choice.series_uid}: {error}",
                                        series_uid=choice.series_uid, selection=selection, timings=timings)
    if settings.retention.keep == "volume" and choice.summary.kept is None:
        step = time.perf_counter()
        save_kept_volume(folder, choice.summary, volume, header)  # the spool goes once the study is reported
        timings["keep_volume_s"] = time.perf_counter() - step
    payload = study_payload(header, request.pseudonym_key_file.read_bytes(), bundle_id=request.bundle_id,
                            version=request.version, n_slices=int(volume.shape[2]))
    return EmbedOutcome.for_request(request, EmbedStatus.EMBEDDED, series_uid=choice.series_uid,
                                    selection=selection, vector=[float(v) for v in vector], payload=payload,
                                    timings=timings)


def embed_study(settings: Settings, request: EmbedRequest) -> EmbedStatus:
    """Compute and write the outcome of one study version; returns its status.

    Unexpected errors (a broken bundle, a full disk) are written as a ``failed`` outcome too, so the node never
    waits for an outcome that cannot come; they are logged with their traceback.
    """
    started = time.perf_counter()
    try:
        outcome = compute_outcome(settings, request)
    except Exception as error:  # noqa: BLE001 - recorded in the outcome, with the traceback in the log
        logger.exception("event=embed_error study_uid=%s version=%d", request.study_uid, request.version)
        outcome = EmbedOutcome.for_request(request, EmbedStatus.FAILED, reason=f"{type(error).__name__}: {error}")
    outcome.timings["total_s"] = time.perf_counter() - started
    write_outcome(request.outcome_path, outcome)
    logger.info("event=embed_done study_uid=%s version=%d status=%s seconds=%.2f", request.study_uid,
                request.version, outcome.status.value, outcome.timings["total_s"])
    return outcome.status
