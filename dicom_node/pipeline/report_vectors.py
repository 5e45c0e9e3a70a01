"""Reports into the index: embed a report's text and put it on its study's point as the ``report`` vector.

Single writer: the node is the index's only writer and every index write holds the node's ``index_write_lock``
(the pipeline's indexing step and :meth:`ReportVectors.apply`). Inside that lock each writer reads the other's
latest state (the pipeline reads the stored report; a report reads the stored point), so a report that arrives
while its study's images are being indexed is never lost, whichever write comes second.

A report may come before its images: it is stored, and the pipeline's indexing step adds its vector
(:meth:`ReportVectors.vector_for`) when it upserts the study. A new report replaces the old one and its vector.

One :class:`ReportVectors` per collection the node keeps (the active bundle's and its followers', see
``dicom_node.lifecycle``); :class:`ReportFanout` stores a report once and puts its vector into each of them.
With no bundle yet the text is stored and embedded once a bundle is active (its start-up reconcile).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from workers.dicom_uids import InvalidUIDError, check_uid
from dicom_node.store.reports import ReportRecord, ReportSource, ReportStore
from model_export.runtime import ModelBundle
from workers.index import VectorIndex, point_id_for
from workers.index.base import IMAGE_VECTOR, REPORT_VECTOR
from workers.search import QueryError

logger = logging.getLogger(__name__)

SOURCES: tuple[ReportSource, ...] = ("dicom-sr", "rest")


def _same_vector(stored: Sequence[float] | None, vector: Sequence[float]) -> bool:
    if not stored or len(stored) != len(vector):
        return False
    return bool(np.allclose(np.asarray(stored, dtype=np.float64), np.asarray(vector, dtype=np.float64), atol=1e-5))


def checked_report(study_uid: str, text: str, source: ReportSource) -> str:
    """The study UID of a report that may be stored; :class:`~workers.search.QueryError` saying what is wrong."""
    try:
        study_uid = check_uid(study_uid, "StudyInstanceUID")
    except InvalidUIDError as error:
        raise QueryError(str(error)) from None
    if source not in SOURCES:
        raise ValueError(f"report source must be one of {SOURCES}, got {source!r}")
    if not isinstance(text, str) or not text.strip():
        raise QueryError("report text must not be empty or whitespace only")
    return study_uid


class ReportVectors:
    """Stores reports, embeds them with the node's bundle and writes their vectors into the index."""

    def __init__(self, reports: ReportStore, index: VectorIndex, bundle: ModelBundle,
                 index_write_lock: threading.RLock) -> None:
        self.reports = reports
        self.index = index
        self.bundle = bundle
        self.bundle_id = bundle.bundle_id
        self.index_write_lock = index_write_lock

    def attach(self, study_uid: str, text: str, source: ReportSource, *,
               sop_instance_uid: str | None = None) -> ReportRecord:
        """Store (or replace) a study's report and, if the study is indexed, its ``report`` vector.

        Raises :class:`~workers.search.QueryError` for an empty text or an invalid study UID. If embedding
        fails the text is stored all the same (and embedded when next needed) and the error propagates.
        """
        study_uid = checked_report(study_uid, text, source)
        try:
            vector = [float(v) for v in self.bundle.embed_text(text)]
        except Exception:
            self.reports.put(study_uid, text, source, sop_instance_uid=sop_instance_uid)
            raise
        record = self.reports.put(study_uid, text, source, vector=vector, bundle_id=self.bundle_id,
                                  sop_instance_uid=sop_instance_uid)
        indexed = self.apply(study_uid)
        logger.info("event=report_attached study_uid=%s source=%s chars=%d indexed=%s", study_uid, source,
                    len(text), indexed)
        return record

    def vector_for(self, study_uid: str) -> list[float] | None:
        """The study's report vector by this bundle (embedded now if the stored one is missing or older)."""
        record = self.reports.get(study_uid)
        if record is None:
            return None
        vector = record.vector_of(self.bundle_id)
        if vector is None:
            vector = [float(v) for v in self.bundle.embed_text(record.text)]
            self.reports.set_vector(record, self.bundle_id, vector)
        return vector

    def apply(self, study_uid: str) -> bool:
        """Write the stored report's vector onto the study's point; False when the study is not indexed."""
        point_id = point_id_for(study_uid, self.bundle_id)
        with self.index_write_lock:
            point = self.index.get(point_id)
            if point is None or not point.vectors.get(IMAGE_VECTOR):
                return False
            vector = self.vector_for(study_uid)
            if vector is None:
                return False
            if point.payload.get("has_report") and _same_vector(point.vectors.get(REPORT_VECTOR), vector):
                return True  # already there (a restart, a re-sent report)
            self.index.upsert(point_id, {IMAGE_VECTOR: point.vectors[IMAGE_VECTOR], REPORT_VECTOR: vector},
                              {**point.payload, "has_report": True})
        return True

    def reconcile(self) -> int:
        """At start: put every stored report on its indexed study (a crash between store and upsert, a new
        bundle); returns how many points were checked. Errors are logged per study, never raised."""
        applied = 0
        for study_uid in self.reports.study_uids():
            try:
                applied += self.apply(study_uid)
            except Exception:  # noqa: BLE001 - one bad record must not stop the node from starting
                logger.exception("event=report_reconcile_failed study_uid=%s", study_uid)
        if applied:
            logger.info("event=reports_reconciled indexed_with_report=%d", applied)
        return applied


class ReportFanout:
    """A report into every collection the node keeps: embedded and stored by the active bundle, then put on the
    study's point in each follower collection by the follower's own bundle.

    ``slots()`` gives the current :class:`ReportVectors`, active first (empty: no bundle yet, the text is
    stored alone).
    """

    def __init__(self, reports: ReportStore, slots: Callable[[], Sequence[ReportVectors]],
                 index_write_lock: threading.RLock) -> None:
        self.reports = reports
        self.slots = slots
        self.index_write_lock = index_write_lock

    def attach(self, study_uid: str, text: str, source: ReportSource, *,
               sop_instance_uid: str | None = None) -> ReportRecord:
        """As :meth:`ReportVectors.attach`, for every collection."""
        with self.index_write_lock:  # one set of collections for the whole report (a switch waits)
            slots = list(self.slots())
            if not slots:
                study_uid = checked_report(study_uid, text, source)
                record = self.reports.put(study_uid, text, source, sop_instance_uid=sop_instance_uid)
                logger.info("event=report_attached study_uid=%s source=%s chars=%d indexed=False bundle=none",
                            study_uid, source, len(text))
                return record
            record = slots[0].attach(study_uid, text, source, sop_instance_uid=sop_instance_uid)
            for follower in slots[1:]:
                try:
                    follower.apply(record.study_uid)
                except Exception:  # noqa: BLE001 - the follower's sync or start-up reconcile adds it later
                    logger.exception("event=report_follower_failed study_uid=%s bundle_id=%s", record.study_uid,
                                     follower.bundle_id)
            return record

    def reconcile(self) -> int:
        return sum(slot.reconcile() for slot in self.slots())
