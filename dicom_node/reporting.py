"""From a worker's outcome to an indexed study and a Structured Report queued for delivery.

Two steps, both run by the node (the index's single owner): :func:`index_outcome` upserts the vector as soon as
the outcome appears; :func:`report_study` searches, builds the SR and queues its deliveries once no study that
completed alongside it is still being embedded (:func:`batch_mates_pending`), so a batch pushed together can
name each other. Every step is idempotent: the point id is derived from
(study, bundle), the SR's UIDs from (study, bundle, result version), deliveries are unique per (SR,
destination); so processing the same outcome twice after a crash changes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pydicom

from config import Settings
from config.settings import Destination
from dicom_node.layout import NodeLayout, write_atomic
from dicom_node.similar_case_sr import SimilarCase, build_similar_case_sr
from dicom_node.state import StateStore, StudyRow
from workers.index import VectorIndex, point_id_for

logger = logging.getLogger(__name__)


@dataclass
class ReportResult:
    """What one study's report produced."""

    sr_sop_uid: str
    matches: int
    destinations: list[str]
    timings: dict[str, float] = field(default_factory=dict)


def destinations_for(settings: Settings, study: StudyRow) -> list[Destination]:
    """Configured destinations, else the sending source when its address is configured in ``node.allow``."""
    if settings.node.destinations:
        return list(settings.node.destinations)
    for source in settings.node.allow:
        if source.ae_title == study.calling_ae and source.port is not None:
            host = source.host or study.peer_ip
            if host:
                return [Destination(ae_title=source.ae_title, host=host, port=source.port)]
    return []


def similar_cases(index: VectorIndex, settings: Settings, vector: list[float], payload: dict[str, Any]) -> list[SimilarCase]:
    """The K most similar *other* studies (and other patients, unless the policy includes them)."""
    exclude_patient = payload.get("patient_pseudonym") if settings.index.same_patient == "exclude" else None
    matches = index.search(vector, settings.index.top_k, exclude_study_uid=payload["study_uid"],
                           exclude_patient=exclude_patient)
    return [
        SimilarCase(rank=rank, score=float(match.score), study_uid=str(match.payload.get("study_uid")),
                    accession=match.payload.get("accession"), study_date=match.payload.get("study_date"),
                    description=match.payload.get("study_description"))
        for rank, match in enumerate(matches, start=1)
    ]


def index_outcome(index: VectorIndex, study: StudyRow, outcome: dict[str, Any]) -> tuple[str, float]:
    """Upsert one embedded outcome; returns the point id and the seconds it took."""
    started = time.perf_counter()
    bundle_id, vector = str(outcome["bundle_id"]), outcome["vector"]
    index.ensure_collection(bundle_id, len(vector))
    point_id = point_id_for(study.study_uid, bundle_id)
    index.upsert(point_id, vector, outcome["payload"])
    return point_id, time.perf_counter() - started


def report_study(settings: Settings, layout: NodeLayout, store: StateStore, index: VectorIndex,
                 bundle_manifest: dict[str, Any], study: StudyRow, outcome: dict[str, Any]) -> ReportResult:
    """Find an indexed study's similar cases, write its SR and queue one delivery per destination."""
    timings: dict[str, float] = {}
    bundle_id = str(outcome["bundle_id"])
    step = time.perf_counter()
    cases = similar_cases(index, settings, outcome["vector"], outcome["payload"])
    timings["search_s"] = time.perf_counter() - step

    step = time.perf_counter()
    series_folder = layout.study_spool(study.study_uid) / str(outcome["series_uid"])
    query_instance = pydicom.dcmread(sorted(series_folder.glob("*.dcm"))[0], stop_before_pixels=True)
    model = bundle_manifest.get("model", {})
    sr = build_similar_case_sr(query_instance, cases, bundle_id=bundle_id,
                               bundle_name=str(model.get("name") or "MedFinder"),
                               bundle_version=str(model.get("version") or bundle_id[:12]),
                               result_version=int(outcome["version"]), settings=settings.results)
    sr_path = layout.result_path(study.study_uid, sr.SOPInstanceUID)
    buffer = pydicom.filebase.DicomBytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    write_atomic(sr_path, buffer.getvalue())
    timings["sr_s"] = time.perf_counter() - step

    targets = destinations_for(settings, study)
    for destination in targets:
        store.add_delivery(study.study_uid, int(outcome["version"]), sr.SOPInstanceUID, sr_path, destination.label,
                           destination.ae_title, destination.host, destination.port)
    if not targets:
        logger.warning("event=no_destination study_uid=%s calling_ae=%s hint='set node.destinations or the "
                       "source port in node.allow'", study.study_uid, study.calling_ae)
    return ReportResult(sr.SOPInstanceUID, len(cases), [d.label for d in targets], timings)


def batch_mates_pending(study: StudyRow, unfinished: list[StudyRow], window_s: float) -> bool:
    """True while a study whose last instance arrived within ``window_s`` of this one's is not indexed yet.

    ``unfinished``: the studies still receiving or being embedded. The bound is per study (its own last arrival
    plus the window), so a steady stream of studies delays each SR by at most one window plus an embedding.
    """
    return any(other.study_uid != study.study_uid and other.last_received <= study.last_received + window_s
               for other in unfinished)
