"""The running node: SCP, study assembler, outcome collector and SR delivery, wired together.

Threads: pynetdicom's association threads (receive only: validate, spool, record); one *pipeline* thread
(fires quiet studies, collects worker outcomes, indexes them and builds SRs — the index's single owner); one
*delivery* thread (C-STORE of SRs with bounded retries). Embedding runs on the dispatcher: a thread pool in
embedded mode, Celery workers in distributed mode.

Restart safety: everything the pipeline acts on is read back from the state store and the spool on every tick,
so after a crash pending studies resume their quiet timers, queued studies whose outcome already exists are
reported, and those without one are dispatched again (same version: the task is idempotent).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from config import Settings
from dicom_node.delivery import DeliveryWorker
from dicom_node.ingest import reconcile_spool
from dicom_node.layout import NodeLayout, write_atomic
from dicom_node.reporting import batch_mates_pending, index_outcome, report_study
from dicom_node.scp import StorageSCP
from dicom_node.state import StateStore, StudyRow, StudyState
from model_export.bundle_manifest import read_manifest
from model_export.registry import active_bundle_path
from workers.dispatch import Dispatcher, make_dispatcher
from workers.embed_study import EMBEDDED, NOT_EMBEDDED, read_outcome
from workers.index import VectorIndex, open_index

logger = logging.getLogger(__name__)


class Node:
    """One MedFinder node; ``start()`` returns once it accepts associations, ``stop()`` shuts it down."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.layout = NodeLayout.create(settings.paths.data_dir)
        self.layout.pseudonym_key()  # made here, before any worker needs it
        bundle_path = active_bundle_path(settings)
        self.bundle_manifest: dict[str, Any] = read_manifest(bundle_path)
        self.bundle_id = str(self.bundle_manifest["bundle_id"])
        self.store = StateStore(self.layout.state_db)
        self.index: VectorIndex = open_index(settings, self.layout)
        self.index.ensure_collection(self.bundle_id, int(self.bundle_manifest["embedding_dim"]))
        self.dispatcher = dispatcher or make_dispatcher(settings)
        self.scp = StorageSCP(settings, self.layout, self.store)
        self.delivery = DeliveryWorker(settings, self.store)
        self._index_seconds: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = reconcile_spool(self.layout, self.store, quiet_seconds=self.settings.node.quiet_seconds)
        if recovered:
            logger.info("event=spool_reconciled instances=%d", recovered)
        self._threads = [
            threading.Thread(target=self._pipeline_loop, name="pipeline", daemon=True),
            threading.Thread(target=self.delivery.run_forever, args=(self._stop,), name="delivery", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.scp.start()
        logger.info("event=node_ready ae_title=%s bind=%s port=%d mode=%s bundle_id=%s data_dir=%s",
                    self.settings.node.ae_title, self.settings.node.bind, self.scp.port,
                    self.settings.workers.mode, self.bundle_id, self.layout.root)

    def stop(self) -> None:
        self.scp.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.dispatcher.close()
        self.index.close()
        self.store.close()
        logger.info("event=node_stopped")

    def wait(self) -> None:
        """Block until ``stop()`` is called from another thread or a signal handler."""
        while not self._stop.wait(0.5):
            pass

    # --- pipeline ---------------------------------------------------------------------------------

    def _pipeline_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pipeline_tick()
            except Exception:  # noqa: BLE001 - keep the node alive; the tick retries everything next time
                logger.exception("event=pipeline_error")
            self._stop.wait(self.settings.node.poll_interval_s)

    def pipeline_tick(self, now: float | None = None) -> None:
        """One pass: fire quiet studies, index finished outcomes, report indexed studies whose batch is done."""
        now = time.time() if now is None else now
        for study in self.store.due_studies(now, self.scp.studies_in_flight(), self.settings.node.max_open_wait_s):
            version = self.store.mark_queued(study.study_uid, self.bundle_id, now)
            if version is not None:
                logger.info("event=study_complete study_uid=%s version=%d instances=%d quiet_wait_s=%.2f",
                            study.study_uid, version, study.n_instances, now - study.last_received)
                self._dispatch(study.study_uid, version)
        for study in self.store.queued_studies():
            outcome = read_outcome(self.layout.outcome_path(study.study_uid, study.version))
            if outcome is not None:
                self._collect(study, outcome)
            elif study.dispatched_at is None or now - study.dispatched_at > self.settings.workers.redispatch_after_s:
                logger.warning("event=redispatch study_uid=%s version=%d", study.study_uid, study.version)
                self.store.touch_dispatch(study.study_uid, now)
                self._dispatch(study.study_uid, study.version)
        unfinished = self.store.unfinished_studies()
        for study in self.store.indexed_studies():
            waited = now - (study.dispatched_at or now)
            if waited < self.settings.node.report_max_wait_s and \
                    batch_mates_pending(study, unfinished, self.settings.node.report_batch_window_s):
                continue
            self._report(study)

    def _dispatch(self, study_uid: str, version: int) -> None:
        try:
            self.dispatcher.submit(study_uid, version, self.bundle_id)
        except Exception as error:  # noqa: BLE001 - broker down: the redispatch timer tries again
            logger.error("event=dispatch_failed study_uid=%s version=%d error=%r", study_uid, version, error)

    def _collect(self, study: StudyRow, outcome: dict[str, Any]) -> None:
        """A worker outcome: index the vector, or record why there is none."""
        status, version = outcome.get("status"), study.version
        selection = json.dumps(outcome.get("selection")) if outcome.get("selection") else None
        if status == EMBEDDED:
            try:
                point_id, seconds = index_outcome(self.index, study, outcome)
            except Exception as error:  # noqa: BLE001 - recorded on the study; a resend makes a new version
                logger.exception("event=index_failed study_uid=%s version=%d", study.study_uid, version)
                self.store.finish(study.study_uid, version, StudyState.FAILED, reason=f"indexing: {error!r}",
                                  series_uid=outcome.get("series_uid"), selection=selection)
                return
            self._index_seconds[(study.study_uid, version)] = seconds
            self.store.finish(study.study_uid, version, StudyState.INDEXED, series_uid=outcome.get("series_uid"),
                              selection=selection, point_id=point_id)
            logger.info("event=study_indexed study_uid=%s version=%d point_id=%s", study.study_uid, version, point_id)
        else:
            state = StudyState.NOT_EMBEDDED if status == NOT_EMBEDDED else StudyState.FAILED
            self.store.finish(study.study_uid, version, state, reason=str(outcome.get("reason")),
                              series_uid=outcome.get("series_uid"), selection=selection)
            logger.warning("event=study_%s study_uid=%s version=%d reason=%r", state.value, study.study_uid, version,
                           outcome.get("reason"))

    def _report(self, study: StudyRow) -> None:
        """Search, build the SR and queue its deliveries for an indexed study."""
        version = study.version
        outcome = read_outcome(self.layout.outcome_path(study.study_uid, version))
        started = time.time()
        try:
            if outcome is None:
                raise FileNotFoundError(f"outcome v{version} of an indexed study is missing")
            result = report_study(self.settings, self.layout, self.store, self.index, self.bundle_manifest, study,
                                  outcome)
        except Exception as error:  # noqa: BLE001 - recorded on the study; an operator can resend it
            logger.exception("event=report_failed study_uid=%s version=%d", study.study_uid, version)
            self.store.finish(study.study_uid, version, StudyState.FAILED, reason=f"reporting: {error!r}")
            return
        result.timings["index_s"] = self._index_seconds.pop((study.study_uid, version), 0.0)
        self._write_report_timings(study, outcome, result.timings, started)
        self.store.finish(study.study_uid, version, StudyState.REPORTED)
        logger.info("event=study_reported study_uid=%s version=%d matches=%d sr_uid=%s destinations=%d",
                    study.study_uid, version, result.matches, result.sr_sop_uid, len(result.destinations))

    def _write_report_timings(self, study: StudyRow, outcome: dict[str, Any], timings: dict[str, float],
                              started: float) -> None:
        """Where the seconds went, per study version (read by the latency benchmark and operators)."""
        record = {
            "study_uid": study.study_uid, "version": study.version,
            "last_received": study.last_received, "dispatched_at": study.dispatched_at,
            "quiet_wait_s": (study.dispatched_at or started) - study.last_received,
            "worker": outcome.get("timings", {}), "node": timings,
            "outcome_seen_at": started, "reported_at": time.time(),
        }
        path = self.layout.outcome_path(study.study_uid, study.version).with_suffix(".report.json")
        write_atomic(path, json.dumps(record).encode("utf-8"))
