"""The node's pipeline: quiet studies -> embed requests -> worker outcomes -> index -> reports.

One thread runs :meth:`Pipeline.tick` in a loop; it is the index's single owner. Everything a tick acts on is
read back from the state store and the data folder, so after a crash pending studies resume their quiet timers,
queued studies whose outcome already exists are indexed and reported, and those without one are dispatched
again (the same request: the task is idempotent).

What the pipeline embeds with comes from the node's model lifecycle (``dicom_node.lifecycle``), asked each pass:
the active bundle and its collection, followers kept in step (a reindex), and whether to hold new studies (no
bundle yet, or a switch waiting for the studies in progress). A held study stays ``receiving`` with its quiet
timer run out and goes on as soon as the hold ends.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from config import Settings
from dicom_node.metrics import observe_embed
from dicom_node.pipeline.batching import batch_mates_pending
from dicom_node.pipeline.indexing import collect_outcome
from dicom_node.pipeline.retention import apply_retention
from dicom_node.report.reporting import report_study
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore, StudyRow, StudyState
from model_export.atomic_files import write_atomic
from workers.dispatch import Dispatcher
from workers.handoff import EmbedOutcome, EmbedRequest, EmbedStatus, read_outcome

if TYPE_CHECKING:
    from dicom_node.lifecycle.manager import ModelLifecycle
    from dicom_node.lifecycle.slots import BundleSlot

logger = logging.getLogger(__name__)


class Pipeline:
    """Assemble, dispatch, collect and report, one pass per :meth:`tick`."""

    def __init__(self, settings: Settings, layout: NodeLayout, store: StateStore, lifecycle: ModelLifecycle,
                 dispatcher: Dispatcher, studies_in_flight: Callable[[], Collection[str]], *,
                 index_lock: threading.RLock | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self.studies_in_flight = studies_in_flight  # studies an open association is still sending
        self._index_seconds: dict[tuple[str, int], float] = {}
        # Every index write holds this lock (the node's, shared with report attachment): one writer at a time.
        self.index_lock = index_lock or threading.RLock()
        self._holding: str | None = None  # why new studies are held (logged once per hold)

    def tick(self, now: float | None = None) -> None:
        """One pass: the model lifecycle (a bundle arriving, a reindex, a switch), then fire quiet studies, index
        finished outcomes, report indexed studies whose batch is done."""
        now = time.time() if now is None else now
        self.lifecycle.tick(now)
        active = self.lifecycle.models.active
        self._assemble(active, now)
        if active is not None:
            self._collect(active, now)
            self._report_ready(active, now)

    # --- assembly: a study is complete when it has been quiet long enough ------------------------------

    def _assemble(self, active: BundleSlot | None, now: float) -> None:
        due = self.store.due_studies(now, self.studies_in_flight(), self.settings.node.max_open_wait_s)
        if active is None or self.lifecycle.hold_new_studies:
            reason = "no active bundle yet" if active is None else "switching bundles"
            if due and self._holding != reason:
                logger.warning("event=studies_held count=%d reason=%r", len(due), reason)
            self._holding = reason if due else self._holding
            return
        if self._holding is not None:
            logger.info("event=studies_released bundle_id=%s", active.bundle_id)
            self._holding = None
        for study in due:
            version = self.store.mark_queued(study.study_uid, active.bundle_id, now)
            if version is not None:
                logger.info("event=study_complete study_uid=%s version=%d instances=%d quiet_wait_s=%.2f",
                            study.study_uid, version, study.n_instances, now - study.last_received)
                self._dispatch(study.study_uid, version, active.bundle_id)

    def embed_request(self, study_uid: str, version: int, bundle_id: str | None = None,
                      outcome_path: Path | None = None) -> EmbedRequest:
        """The hand-off for one study version: its spool folder in, its outcome file out (by default: the active
        bundle and the study's own outcome file; a follower collection names its bundle and file)."""
        if bundle_id is None:
            active = self.lifecycle.models.active
            if active is None:
                raise LookupError("no model bundle active yet")
            bundle_id = active.bundle_id
        return EmbedRequest(study_uid=study_uid, version=version, bundle_id=bundle_id,
                            study_folder=self.layout.study_spool(study_uid),
                            outcome_path=outcome_path or self.layout.outcome_path(study_uid, version),
                            pseudonym_key_file=self.layout.pseudonym_key_file)

    def _dispatch(self, study_uid: str, version: int, bundle_id: str) -> None:
        try:
            self.dispatcher.submit(self.embed_request(study_uid, version, bundle_id))
        except Exception as error:  # noqa: BLE001 - broker down: the redispatch timer tries again
            logger.error("event=dispatch_failed study_uid=%s version=%d error=%r", study_uid, version, error)

    # --- collection: outcomes into the index, or a re-dispatch when one is overdue -----------------------

    def _collect(self, active: BundleSlot, now: float) -> None:
        for study in self.store.queued_studies():
            outcome = read_outcome(self.layout.outcome_path(study.study_uid, study.version))
            if outcome is not None and outcome.bundle_id != active.bundle_id:
                # Made by a bundle that no longer serves (a restart with another pointer): embed it again.
                logger.warning("event=redispatch study_uid=%s version=%d reason=bundle_changed", study.study_uid,
                               study.version)
                self.layout.outcome_path(study.study_uid, study.version).unlink(missing_ok=True)
                outcome = None
                study = replace(study, dispatched_at=None)
            if outcome is not None:
                with self.index_lock:  # the report read and the upsert together, against a report arriving now
                    report = (self._report_vector(active, study.study_uid) if outcome.status == EmbedStatus.EMBEDDED
                              else None)
                    seconds = collect_outcome(self.store, active.index, study, outcome, report)
                observe_embed(outcome)  # metrics: the worker's timings, once per collected outcome
                if seconds is not None:
                    self._index_seconds[(study.study_uid, study.version)] = seconds
            elif study.dispatched_at is None or now - study.dispatched_at > self.settings.workers.redispatch_after_s:
                logger.warning("event=redispatch study_uid=%s version=%d", study.study_uid, study.version)
                self.store.touch_dispatch(study.study_uid, now)
                self._dispatch(study.study_uid, study.version, active.bundle_id)

    @staticmethod
    def _report_vector(active: BundleSlot, study_uid: str) -> Sequence[float] | None:
        """The study's report vector to index with its images; a failure costs the report, not the study."""
        try:
            return active.reports.vector_for(study_uid)
        except Exception:  # noqa: BLE001 - indexed without it; the node's start-up reconcile adds it later
            logger.exception("event=report_vector_failed study_uid=%s", study_uid)
            return None

    # --- reporting: once a study's batch is indexed ----------------------------------------------------

    def _report_ready(self, active: BundleSlot, now: float) -> None:
        unfinished = self.store.unfinished_studies()
        if self.lifecycle.switching:  # held studies would hold their batch mates' SRs, and the switch with them
            unfinished = [study for study in unfinished if study.state == StudyState.QUEUED]
        for study in self.store.indexed_studies():
            waited = now - (study.dispatched_at or now)
            if waited < self.settings.node.report_max_wait_s and \
                    batch_mates_pending(study, unfinished, self.settings.node.report_batch_window_s):
                continue
            self._report(active, study)

    def _report(self, active: BundleSlot, study: StudyRow) -> None:
        """Search, build the SR and queue its deliveries for an indexed study (none for a quiet backfill)."""
        version = study.version
        # A backfilled study's instances arrive within the fetch's arrival timeout (plus the quiet timer) of the
        # suppression being recorded; anything later is a live send and gets its SR.
        window = self.settings.backfill.arrival_timeout_s + self.settings.node.quiet_seconds_for(study.calling_ae)
        if self.store.reports_suppressed(study, window):
            self.store.finish(study.study_uid, version, StudyState.BACKFILLED)
            logger.info("event=study_backfilled study_uid=%s version=%d", study.study_uid, version)
            apply_retention(self.settings, self.layout, self.store, study.study_uid, version, self.studies_in_flight())
            return
        outcome = read_outcome(self.layout.outcome_path(study.study_uid, version))
        started = time.time()
        try:
            if outcome is None:
                raise FileNotFoundError(f"outcome v{version} of an indexed study is missing")
            result = report_study(self.settings, self.layout, self.store, active.index, active.manifest, study,
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
        apply_retention(self.settings, self.layout, self.store, study.study_uid, version, self.studies_in_flight())

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
