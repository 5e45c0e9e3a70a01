"""A worker's outcome into the index and the state store (the node is the index's only writer).

Idempotent: the point id is derived from (study, bundle), so collecting the same outcome twice after a crash
overwrites the same point.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

from dicom_node.store.state import StateStore, StudyRow, StudyState
from workers.handoff import EmbedOutcome, EmbedStatus
from workers.index import VectorIndex, point_id_for
from workers.index.base import IMAGE_VECTOR, REPORT_VECTOR

logger = logging.getLogger(__name__)


def index_outcome(index: VectorIndex, study_uid: str, outcome: EmbedOutcome,
                  report_vector: Sequence[float] | None = None) -> tuple[str, float]:
    """Upsert one embedded outcome (with the study's report vector when its report is known) into ``index``, the
    collection of the outcome's bundle; returns the point id and the seconds it took."""
    if outcome.vector is None or outcome.payload is None:
        raise ValueError(f"outcome v{outcome.version} of {study_uid} is {outcome.status} without a vector")
    started = time.perf_counter()
    index.ensure_collection(outcome.bundle_id, len(outcome.vector))
    point_id = point_id_for(study_uid, outcome.bundle_id)
    vectors: dict[str, Sequence[float]] = {IMAGE_VECTOR: outcome.vector}
    if report_vector is not None:
        vectors[REPORT_VECTOR] = report_vector
    payload = outcome.payload.model_copy(update={"has_report": report_vector is not None}).model_dump()
    index.upsert(point_id, vectors, payload)
    return point_id, time.perf_counter() - started


def collect_outcome(store: StateStore, index: VectorIndex, study: StudyRow, outcome: EmbedOutcome,
                    report_vector: Sequence[float] | None = None) -> float | None:
    """Index the vector, or record why there is none; returns the indexing seconds when the study was indexed."""
    version = study.version
    selection = json.dumps(outcome.selection) if outcome.selection else None
    if outcome.status == EmbedStatus.EMBEDDED:
        try:
            point_id, seconds = index_outcome(index, study.study_uid, outcome, report_vector)
        except Exception as error:  # noqa: BLE001 - recorded on the study; a resend makes a new version
            logger.exception("event=index_failed study_uid=%s version=%d", study.study_uid, version)
            store.finish(study.study_uid, version, StudyState.FAILED, reason=f"indexing: {error!r}",
                         series_uid=outcome.series_uid, selection=selection)
            return None
        store.finish(study.study_uid, version, StudyState.INDEXED, series_uid=outcome.series_uid,
                     selection=selection, point_id=point_id)
        logger.info("event=study_indexed study_uid=%s version=%d point_id=%s", study.study_uid, version, point_id)
        return seconds
    state = StudyState.NOT_EMBEDDED if outcome.status == EmbedStatus.NOT_EMBEDDED else StudyState.FAILED
    store.finish(study.study_uid, version, state, reason=str(outcome.reason), series_uid=outcome.series_uid,
                 selection=selection)
    logger.warning("event=study_%s study_uid=%s version=%d reason=%r", state.value, study.study_uid, version,
                   outcome.reason)
    return None
