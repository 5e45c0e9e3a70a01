"""``GET /studies``, ``GET /studies/{uid}``: the studies the node holds, each with its processing state;
``GET /studies/{uid}/thumbnail``: a PNG of its embedded series (the pages' thumbnails, for any client)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import Response

from dicom_node.api.auth import Reader
from dicom_node.api.models import StudyList, StudySummary
from dicom_node.api.services import ApiServices, Audit, NodeSettings, Services, Store
from dicom_node.report.thumbnails import ThumbnailError, Window, study_thumbnail
from dicom_node.store.state import StateStore, StudyAttributes, StudyRow
from workers.dicom_uids import UID_PATTERN

logger = logging.getLogger(__name__)

router = APIRouter(tags=["studies"])

PNG = "image/png"
# Browsers may keep a thumbnail this long (private: never a shared cache; it is an image of a patient).
THUMBNAIL_MAX_AGE_S = 3600

StudyUID = Annotated[str, Path(max_length=64, pattern=UID_PATTERN.pattern, description="StudyInstanceUID")]


@router.get("/studies", response_model=StudyList, summary="The studies the node holds and their state")
def list_studies(principal: Reader, store: Store, audit: Audit, settings: NodeSettings,
                 limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                 offset: Annotated[int, Query(ge=0)] = 0) -> StudyList:
    with audit.record(principal.token_name, principal.client, "studies",
                      {"limit": limit, "offset": offset}) as audited:
        rows = store.studies()
        page = rows[offset:offset + limit]
        attributes = {a.study_uid: a for a in store.all_study_attributes()}
        studies = [summary(row, attributes.get(row.study_uid), settings.query.return_patient_identity)
                   for row in page]
        audited.results = [s.study_instance_uid for s in studies]
        return StudyList(total=len(rows), studies=studies)


@router.get("/studies/{uid}", response_model=StudySummary, summary="One study and its state",
            responses={404: {"description": "the node holds no such study"}})
def get_study(uid: StudyUID, principal: Reader, store: Store, audit: Audit, settings: NodeSettings) -> StudySummary:
    with audit.record(principal.token_name, principal.client, "study", {"study_uid": uid}) as audited:
        row = study_or_404(store, uid)
        audited.results = [uid]
        return summary(row, store.study_attributes(uid), settings.query.return_patient_identity)


@router.get("/studies/{uid}/thumbnail", response_class=Response, summary="A PNG of the study's embedded series",
            responses={200: {"content": {PNG: {}}, "description": "a 10 mm slab around the middle axial slice "
                                                                  "(MIP in the lung window, mean otherwise)"},
                       404: {"description": "the node holds no image of this study (unknown, or spool gone)"}})
def thumbnail(uid: StudyUID, principal: Reader, services: Services, audit: Audit,
              window: Annotated[Literal["lung", "mediastinum"] | None, Query(
                  description="display window (default ui.thumbnail_window)")] = None) -> Response:
    chosen: Window = window or services.settings.ui.thumbnail_window
    with audit.record(principal.token_name, principal.client, "thumbnail",
                      {"study_uid": uid, "window": chosen}) as audited:
        data = thumbnail_png(services, uid, chosen)
        if data is None:
            raise HTTPException(404, detail=f"no image of study {uid} on this node")
        audited.results = [uid]
        return png_response(data)


def thumbnail_png(services: ApiServices, uid: str, window: Window) -> bytes | None:
    """The study's thumbnail (rendered once, then from the cache), or None when the node has no image of it:
    unknown study, spool gone, or a series that cannot be drawn (logged without PHI)."""
    if services.thumbnails is None or services.layout is None:
        return None
    try:
        return study_thumbnail(services.layout, services.store, services.thumbnails, uid, window=window,
                               size=services.settings.ui.thumbnail_size)
    except ThumbnailError as error:
        logger.warning("event=thumbnail_failed study_uid=%s reason=%s", uid, error)
        return None


def png_response(data: bytes) -> Response:
    return Response(data, media_type=PNG, headers={"Cache-Control": f"private, max-age={THUMBNAIL_MAX_AGE_S}"})


def study_or_404(store: StateStore, uid: str) -> StudyRow:
    row = store.study(uid)
    if row is None:
        raise HTTPException(404, detail=f"no study {uid} on this node")
    return row


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def summary(row: StudyRow, attributes: StudyAttributes | None, with_identity: bool) -> StudySummary:
    """A state row and its attributes as the API shows them (patient identity only where policy allows)."""
    item = StudySummary(study_instance_uid=row.study_uid, state=row.state.value, reason=row.reason,
                        version=row.version, n_instances=row.n_instances, calling_ae=row.calling_ae,
                        first_received=_iso(row.first_received), last_received=_iso(row.last_received),
                        indexed_series_uid=row.series_uid)
    if attributes is not None:
        item.study_date = attributes.study_date
        item.study_time = attributes.study_time
        item.accession_number = attributes.accession_number
        item.study_description = attributes.study_description
        item.modalities_in_study = list(attributes.modalities_in_study)
        item.number_of_series = attributes.number_of_series
        if with_identity:
            item.patient_name = attributes.patient_name
            item.patient_id = attributes.patient_id
    return item
