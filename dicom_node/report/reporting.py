"""An indexed study's similar cases as a Structured Report (and its PDF companion), written and queued for delivery.

Run by the pipeline once the study is indexed and no study that completed alongside it is still being embedded
(``dicom_node.pipeline.batching``), so a batch pushed together can name each other. Idempotent: the SR's UIDs
are derived from (study, bundle, result version) and deliveries are unique per (SR, destination), so reporting
the same outcome twice after a crash changes nothing. The PDF companion (``results.companion: pdf``) follows the
same rules with its own UIDs; a thumbnail that cannot be drawn leaves a placeholder box, never a missing SR.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from config import Settings
from config.settings import Destination
from dicom_node.report.companion import (
    QueryStudy,
    build_companion_dicom,
    build_companion_pdf,
    companion_bytes,
)
from dicom_node.report.similar_case_sr import SimilarCase, build_similar_case_sr
from dicom_node.report.thumbnails import ThumbnailCache, ThumbnailError, series_image_source, study_thumbnail
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyRow
from model_export.atomic_files import write_atomic
from model_export.bundle_manifest import BundleManifest
from workers.handoff import EmbedOutcome, StudyPayload
from workers.index import SearchFilters, VectorIndex
from workers.volume_store import series_header, volume_folder

logger = logging.getLogger(__name__)


@dataclass
class ReportResult:
    """What one study's report produced."""

    sr_sop_uid: str
    matches: int
    destinations: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    companion_sop_uid: str | None = None  # the Encapsulated PDF, when results.companion is "pdf"


def destinations_for(settings: Settings, study: StudyRow) -> list[Destination]:
    """Configured destinations, else the sending source when its address is configured in ``node.allow`` (over
    TLS when that entry says ``tls``)."""
    if settings.node.destinations:
        return list(settings.node.destinations)
    for source in settings.node.allow:
        if source.ae_title == study.calling_ae and source.port is not None:
            host = source.host or study.peer_ip
            if host:
                return [Destination(ae_title=source.ae_title, host=host, port=source.port, tls=source.tls)]
    return []


def similar_cases(index: VectorIndex, settings: Settings, vector: list[float],
                  payload: StudyPayload) -> list[SimilarCase]:
    """The K most similar *other* studies (and other patients, unless the policy includes them)."""
    exclude_patient = payload.patient_pseudonym if settings.index.same_patient == "exclude" else None
    filters = SearchFilters(exclude_study_uid=payload.study_uid, exclude_patient=exclude_patient)
    matches = index.search(vector, settings.index.top_k, filters=filters)
    return [
        SimilarCase(rank=rank, score=float(match.score), study_uid=str(match.payload.get("study_uid")),
                    accession=match.payload.get("accession"), study_date=match.payload.get("study_date"),
                    description=match.payload.get("study_description"))
        for rank, match in enumerate(matches, start=1)
    ]


def _thumbnails(settings: Settings, layout: NodeLayout, store: StateStore, study_uid: str, series_uid: str,
                cases: list[SimilarCase]) -> dict[str, bytes | None]:
    """Thumbnails for the companion, by Study UID; one that cannot be drawn is None (a placeholder box)."""
    cache = ThumbnailCache(layout.thumbnails)
    window, size = settings.ui.thumbnail_window, settings.ui.thumbnail_size
    images: dict[str, bytes | None] = {}
    try:
        source = series_image_source(layout, study_uid, series_uid)  # the spool, else the kept volume
        images[study_uid] = None if source is None else cache.get(study_uid, series_uid, source, window=window,
                                                                  size=size)
    except (ThumbnailError, OSError, ValueError) as error:
        logger.warning("event=thumbnail_failed study_uid=%s error=%s", study_uid, type(error).__name__)
        images[study_uid] = None
    for case in cases:
        try:
            images[case.study_uid] = study_thumbnail(layout, store, cache, case.study_uid, window=window, size=size)
        except (ThumbnailError, OSError, ValueError) as error:
            logger.warning("event=thumbnail_failed study_uid=%s error=%s", case.study_uid, type(error).__name__)
            images[case.study_uid] = None
    return images


def write_companion(settings: Settings, layout: NodeLayout, store: StateStore, bundle_manifest: BundleManifest,
                    query_instance: pydicom.Dataset, outcome: EmbedOutcome,
                    cases: list[SimilarCase]) -> tuple[str, Path]:
    """Build the PDF companion of one result version and write it beside the SR; (SOP Instance UID, path)."""
    model = bundle_manifest.model
    bundle_name = model.name or "MedFinder"
    bundle_version = model.version or outcome.bundle_id[:12]
    query = QueryStudy.from_header(query_instance)
    thumbnails = _thumbnails(settings, layout, store, query.study_uid, str(outcome.series_uid), cases)
    pdf = build_companion_pdf(query, cases, thumbnails=thumbnails, bundle_id=outcome.bundle_id,
                              bundle_name=bundle_name, bundle_version=bundle_version, result_version=outcome.version)
    companion = build_companion_dicom(query_instance, pdf, bundle_id=outcome.bundle_id, bundle_name=bundle_name,
                                      bundle_version=bundle_version, result_version=outcome.version,
                                      settings=settings.results)
    path = layout.result_path(query.study_uid, companion.SOPInstanceUID)
    write_atomic(path, companion_bytes(companion))
    return str(companion.SOPInstanceUID), path


def report_study(settings: Settings, layout: NodeLayout, store: StateStore, index: VectorIndex,
                 bundle_manifest: BundleManifest, study: StudyRow, outcome: EmbedOutcome) -> ReportResult:
    """Find an indexed study's similar cases, write its SR (and PDF companion) and queue one delivery per
    destination for each."""
    timings: dict[str, float] = {}
    if outcome.vector is None or outcome.payload is None or outcome.series_uid is None:
        raise ValueError(f"outcome v{outcome.version} of {study.study_uid} has no vector to search with")
    step = time.perf_counter()
    cases = similar_cases(index, settings, outcome.vector, outcome.payload)
    timings["search_s"] = time.perf_counter() - step

    step = time.perf_counter()
    query_instance = series_header(layout.study_spool(study.study_uid), outcome.series_uid,
                                   volume_folder(layout.root, study.study_uid))
    model = bundle_manifest.model
    sr = build_similar_case_sr(query_instance, cases, bundle_id=outcome.bundle_id,
                               bundle_name=model.name or "MedFinder",
                               bundle_version=model.version or outcome.bundle_id[:12],
                               result_version=outcome.version, settings=settings.results)
    sr_path = layout.result_path(study.study_uid, sr.SOPInstanceUID)
    buffer = pydicom.filebase.DicomBytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    write_atomic(sr_path, buffer.getvalue())
    timings["sr_s"] = time.perf_counter() - step

    objects: list[tuple[str, Path]] = [(str(sr.SOPInstanceUID), sr_path)]
    companion_uid: str | None = None
    if settings.results.companion == "pdf":
        step = time.perf_counter()
        try:
            companion_uid, companion_path = write_companion(settings, layout, store, bundle_manifest,
                                                            query_instance, outcome, cases)
            objects.append((companion_uid, companion_path))
        except Exception as error:  # noqa: BLE001 - the PDF only renders the SR: never let it hold the result back
            # the type only: PDF and pydicom messages can quote header values
            logger.error("event=companion_failed study_uid=%s version=%d error=%s", study.study_uid, outcome.version,
                         type(error).__name__)
        timings["companion_s"] = time.perf_counter() - step

    targets = destinations_for(settings, study)
    for destination in targets:
        for sop_uid, path in objects:  # the SR first: it is the result, the PDF its rendering
            store.add_delivery(study.study_uid, outcome.version, sop_uid, path, destination.label,
                               destination.ae_title, destination.host, destination.port)
    if not targets:
        logger.warning("event=no_destination study_uid=%s calling_ae=%s hint='set node.destinations or the "
                       "source port in node.allow'", study.study_uid, study.calling_ae)
    return ReportResult(sr.SOPInstanceUID, len(cases), [d.label for d in targets], timings, companion_uid)
