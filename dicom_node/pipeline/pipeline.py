"""The node's pipeline: quiet studies -> embed requests -> worker outcomes -> index -> reports.

One thread runs :meth:`Pipeline.tick` in a loop; it is the index's single owner. Everything a tick acts on is
read back from the state store and the data folder, so after a crash pending studies resume their quiet timers,
queued studies whose outcome already exists are indexed and reported, and those without one are dispatched
again (the same request: the task is idempotent).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence

from config import Settings
from dicom_node.pipeline.batching import batch_mates_pending
from dicom_node.pipeline.indexing import collect_outcome
from dicom_node.report.reporting import report_study
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyRow, StudyState
from model_export.atomic_files import write_atomic
from model_export.bundle_manifest import BundleManifest
from workers.dispatch import Dispatcher
from workers.handoff import EmbedOutcome, EmbedRequest, EmbedStatus, read_outcome
from workers.index import VectorIndex

logger = logging.getLogger(__name__)


class Pipeline:
    """Assemble, dispatch, collect and report, one pass per :meth:`tick`."""

    def __init__(self, settings: Settings, layout: NodeLayout, store: StateStore, index: VectorIndex,
                 dispatcher: Dispatcher, bundle: BundleManifest,
                 studies_in_flight: Callable[[], Collection[str]], *, index_lock: threading.RLock | None = None,
                 report_vector_for: Callable[[str], Sequence[float] | None] | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.index = index
        self.dispatcher = dispatcher
        self.bundle = bundle
        self.studies_in_flight = studies_in_flight  # studies an open association is still sending
        self._index_seconds: dict[tuple[str, int], float] = {}
        # Every index write holds this lock (the node's, shared with report attachment): one writer at a time.
        self.index_lock = index_lock or threading.RLock()
        self.report_vector_for = report_vector_for  # a study's stored report vector, or None

    def tick(self, now: float | None = None) -> None:
        """One pass: fire quiet studies, index finished outcomes, report indexed studies whose batch is done."""
        now = time.time() if now is None else now
        self._assemble(now)
        self._collect(now)
        self._report_ready(now)

    # --- assembly: a study is complete when it has been quiet long enough ------------------------------

    def _assemble(self, now: float) -> None:
        for study in self.store.due_studies(now, self.studies_in_flight(), self.settings.node.max_open_wait_s):
            version = self.store.mark_queued(study.study_uid, self.bundle.bundle_id, now)
            if version is not None:
                logger.info("event=study_complete study_uid=%s version=%d instances=%d quiet_wait_s=%.2f",
                            study.study_uid, version, study.n_instances, now - study.last_received)
                self._dispatch(study.study_uid, version)

    def embed_request(self, study_uid: str, version: int) -> EmbedRequest:
        """The hand-off for one study version: its spool folder in, its outcome file out."""
        return EmbedRequest(study_uid=study_uid, version=version, bundle_id=self.bundle.bundle_id,
                            study_folder=self.layout.study_spool(study_uid),
                            outcome_path=self.layout.outcome_path(study_uid, version),
                            pseudonym_key_file=self.layout.pseudonym_key_file)

    def _dispatch(self, study_uid: str, version: int) -> None:
        try:
            self.dispatcher.submit(self.embed_request(study_uid, version))
        except Exception as error:  # noqa: BLE001 - broker down: the redispatch timer tries again
            logger.error("event=dispatch_failed study_uid=%s version=%d error=%r", study_uid, version, error)

    # --- collection: outcomes into the index, or a re-dispatch when one is overdue -----------------------

    def _collect(self, now: float) -> None:
        for study in self.store.queued_studies():
            outcome = read_outcome(self.layout.outcome_path(study.study_uid, study.version))
            if outcome is not None:
                with self.index_lock:  # the report read and the upsert together, against a report arriving now
                    report = self._report_vector(study.study_uid) if outcome.status == EmbedStatus.EMBEDDED else None
                    seconds = collect_outcome(self.store, self.index, study, outcome, report)
                if seconds is not None:
                    self._index_seconds[(study.study_uid, study.version)] = seconds
            elif study.dispatched_at is None or now - study.dispatched_at > self.settings.workers.redispatch_after_s:
                logger.warning("event=redispatch study_uid=%s version=%d", study.study_uid, study.version)
                self.store.touch_dispatch(study.study_uid, now)
                self._dispatch(study.study_uid, study.version)

    def _report_vector(self, study_uid: str) -> Sequence[float] | None:
        """The study's report vector to index with its images; a failure costs the report, not the study."""
        if self.report_vector_for is None:
            return None
        try:
            return self.report_vector_for(study_uid)
        except Exception:  # noqa: BLE001 - indexed without it; the node's start-up reconcile adds it later
            logger.exception("event=report_vector_failed study_uid=%s", study_uid)
            return None

    # --- reporting: once a study's batch is indexed ----------------------------------------------------

    def _report_ready(self, now: float) -> None:
        unfinished = self.store.unfinished_studies()
        for study in self.store.indexed_studies():
            waited = now - (study.dispatched_at or now)
            if waited < self.settings.node.report_max_wait_s and \
                    batch_mates_pending(study, unfinished, self.settings.node.report_batch_window_s):
                continue
            self._report(study)

    def _report(self, study: StudyRow) -> None:
        """Search, build the SR and queue its deliveries for an indexed study."""
        version = study.version
        outcome = read_outcome(self.layout.outcome_path(study.study_uid, version))
        started = time.time()
        try:
            if outcome is None:
                raise FileNotFoundError(f"outcome v{version} of an indexed study is missing")
            result = report_study(self.settings, self.layout, self.store, self.index, self.bundle, study, outcome)
        except Exception as error:  # noqa: BLE001 - recorded on the study; an operator can resend it
            logger.exception("event=report_failed study_uid=%s version=%d", study.study_uid, version)
            self.store.finish(study.study_uid, version, StudyState.FAILED, reason=f"reporting: {error!r}")
            return
        result.timings["index_s"] = self._index_seconds.pop((study.study_uid, version), 0.0)
        self._write_report_timings(study, outcome, result.timings, started)
        self.store.finish(study.study_uid, version, StudyState.REPORTED)
        logger.info("event=study_reported study_uid=%s version=%d matches=%d sr_uid=%s destinations=%d",
                    study.study_uid, version, result.matches, result.sr_sop_uid, len(result.destinations))

    def _write_report_timings(self, study: StudyRow, outcome: EmbedOutcome, timings: dict[str, float],
                              started: float) -> None:
        """Where the seconds went, per study version (read by the latency benchmark and operators)."""
        record = {
            "study_uid": study.study_uid, "version": study.version,
            "last_received": study.last_received, "dispatched_at": study.dispatched_at,
            "quiet_wait_s": (study.dispatched_at or started) - study.last_received,
            "worker": outcome.timings, "node": timings,
            "outcome_seen_at": started, "reported_at": time.time(),
        }
        path = self.layout.outcome_path(study.study_uid, study.version).with_suffix(".report.json")
        write_atomic(path, json.dumps(record).encode("utf-8"))
