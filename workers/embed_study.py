"""The ``embed_study`` task body: one study version in the spool -> an *outcome* file beside it.

It runs unchanged in a thread of the node (embedded mode) and in a Celery worker process on a GPU machine
(distributed mode); both read the spool and write the outcome on the node's data folder (shared storage).
The outcome file — written atomically, named by study and result version — is the worker's only output: the
node, which owns the index and the state store, picks it up, upserts the vector and reports. Re-running a
version rewrites the same file, so redelivered or re-dispatched tasks are harmless.

Outcome statuses: ``embedded`` (vector + payload), ``not_embedded`` (no series qualifies: the reason and each
series' verdict), ``failed`` (the selected series could not be read or embedded: the error).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from config import Settings
from dicom_node.layout import NodeLayout, write_atomic
from dicom_node.series_selection import choose_series, summarise_series
from model_export.preprocessing import VolumeError, load_dicom_series, preprocess_volume
from model_export.registry import find_bundle
from model_export.runtime import ModelBundle, load_bundle

logger = logging.getLogger(__name__)

EMBEDDED, NOT_EMBEDDED, FAILED = "embedded", "not_embedded", "failed"

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


def patient_pseudonym(key: bytes, patient_id: str, issuer: str = "") -> str:
    """A keyed hash of the patient id (HMAC-SHA256): equal ids match, the id itself never leaves the node."""
    return hmac.new(key, f"{issuer}|{patient_id}".encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def index_payload(header: pydicom.Dataset, key: bytes) -> dict[str, Any]:
    """The searchable metadata of one study, from one header of its chosen series."""
    payload: dict[str, Any] = {
        "study_uid": str(header.get("StudyInstanceUID", "")),
        "series_uid": str(header.get("SeriesInstanceUID", "")),
    }
    for name, keyword in PAYLOAD_FIELDS.items():
        value = header.get(keyword)
        payload[name] = str(value) if value not in (None, "") else None
    patient_id = str(header.get("PatientID", "") or "")
    payload["patient_pseudonym"] = (
        patient_pseudonym(key, patient_id, str(header.get("IssuerOfPatientID", "") or "")) if patient_id else None
    )
    return payload


def _outcome(study_uid: str, version: int, bundle_id: str, status: str, **fields: Any) -> dict[str, Any]:
    return {"study_uid": study_uid, "version": version, "bundle_id": bundle_id, "status": status,
            "worker": socket.gethostname(), "finished_at": time.time(), **fields}


def compute_outcome(settings: Settings, layout: NodeLayout, study_uid: str, version: int,
                    bundle_id: str) -> dict[str, Any]:
    """Select, load, preprocess and embed; never raises for bad studies (the outcome says what went wrong)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    files = layout.study_files(study_uid)
    choice = choose_series(summarise_series(files), settings.selection)
    timings["select_s"] = time.perf_counter() - started
    if choice.series_uid is None:
        return _outcome(study_uid, version, bundle_id, NOT_EMBEDDED, reason=choice.reason,
                        selection=choice.as_dict(), timings=timings)
    series_folder = layout.study_spool(study_uid) / choice.series_uid
    try:
        bundle = bundle_for(settings, bundle_id)
        step = time.perf_counter()
        volume = load_dicom_series(series_folder)
        timings["decode_s"] = time.perf_counter() - step
        step = time.perf_counter()
        array = preprocess_volume(volume, bundle.preprocessing)
        timings["preprocess_s"] = time.perf_counter() - step
        step = time.perf_counter()
        vector = bundle.embed_volume(array)
        timings["embed_s"] = time.perf_counter() - step
        header = pydicom.dcmread(next(iter(sorted(series_folder.glob("*.dcm")))), stop_before_pixels=True)
    except VolumeError as error:
        return _outcome(study_uid, version, bundle_id, FAILED, reason=f"series {choice.series_uid}: {error}",
                        series_uid=choice.series_uid, selection=choice.as_dict(), timings=timings)
    payload = index_payload(header, layout.pseudonym_key())
    payload.update(bundle_id=bundle_id, result_version=version, n_slices=int(volume.shape[2]))
    return _outcome(study_uid, version, bundle_id, EMBEDDED, series_uid=choice.series_uid,
                    selection=choice.as_dict(), vector=[float(v) for v in vector], payload=payload, timings=timings)


def embed_study(settings: Settings, study_uid: str, version: int, bundle_id: str) -> str:
    """Compute and write the outcome of one study version; returns its status.

    Unexpected errors (a broken bundle, a full disk) are written as a ``failed`` outcome too, so the node never
    waits for an outcome that cannot come; they are logged with their traceback.
    """
    layout = NodeLayout.create(settings.paths.data_dir)
    started = time.perf_counter()
    try:
        outcome = compute_outcome(settings, layout, study_uid, version, bundle_id)
    except Exception as error:  # noqa: BLE001 - recorded in the outcome, with the traceback in the log
        logger.exception("event=embed_error study_uid=%s version=%d", study_uid, version)
        outcome = _outcome(study_uid, version, bundle_id, FAILED, reason=f"{type(error).__name__}: {error}")
    outcome.setdefault("timings", {})["total_s"] = time.perf_counter() - started
    write_atomic(layout.outcome_path(study_uid, version), json.dumps(outcome).encode("utf-8"))
    logger.info("event=embed_done study_uid=%s version=%d status=%s seconds=%.2f", study_uid, version,
                outcome["status"], outcome["timings"]["total_s"])
    return str(outcome["status"])


def read_outcome(path: Path) -> dict[str, Any] | None:
    """A written outcome, or None while it does not exist yet."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
