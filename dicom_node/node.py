"""The running node: receive, store, pipeline, report and deliver, wired together in one place.

Threads: pynetdicom's association threads (receive only: validate, spool, record); one *pipeline* thread
(:class:`~dicom_node.pipeline.Pipeline`: fires quiet studies, collects worker outcomes, indexes them and builds
SRs); one *delivery* thread (C-STORE of SRs with bounded retries). Embedding runs on the dispatcher: a thread
pool in embedded mode, Celery workers in distributed mode. The node is the index's only writer: the pipeline's
indexing and report attachment (an SR's association thread, a REST request) each hold ``index_write_lock``
around their read-and-upsert (:mod:`dicom_node.pipeline.report_vectors`); queries (``query_engine``) only read.

Restart safety: the spool is reconciled with the state store at start, and the pipeline reads everything it
acts on back from both on every tick (see :mod:`dicom_node.pipeline.pipeline`).

Models: :mod:`dicom_node.lifecycle` decides which bundle serves and keeps other collections in step. A node
with no active bundle starts all the same: it listens, receives and stores, queries answer "no model bundle
active yet", and it embeds what it holds once a bundle is activated in the registry.
"""

from __future__ import annotations

import logging
import threading

from config import Settings
from dicom_node.api.server import ApiServer
from dicom_node.api.wiring import start_api
from dicom_node.deliver.delivery import DeliveryWorker
from dicom_node.lifecycle.manager import ModelLifecycle
from dicom_node.lifecycle.slots import BundleSlot
from dicom_node.pipeline import Pipeline
from dicom_node.pipeline.report_vectors import ReportFanout, ReportVectors
from dicom_node.pipeline.retention import sweep_retention
from dicom_node.receive.ingest import reconcile_spool
from dicom_node.receive.report_sr import ReportReceiver
from dicom_node.receive.scp import StorageSCP
from dicom_node.store.layout import NodeLayout
from dicom_node.store.reports import ReportSource, ReportStore
from dicom_node.store.state import StateStore
from model_export.bundle_manifest import BundleManifest
from model_export.runtime import ModelBundle
from workers.dicom_uids import InvalidUIDError
from workers.dispatch import Dispatcher, make_dispatcher
from workers.handoff import EmbedRequest
from workers.index import VectorIndex, open_catalog
from workers.search import NoBundleError, QueryEngine

logger = logging.getLogger(__name__)


class Node:
    """One MedFinder node; ``start()`` returns once it accepts associations, ``stop()`` shuts it down."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.layout = NodeLayout.create(settings.paths.data_dir)
        self.layout.pseudonym_key()  # made here, before any worker needs it
        self.store = StateStore(self.layout.state_db)
        self.dispatcher = dispatcher or make_dispatcher(settings)
        # Every index write holds this lock (pipeline indexing, report attachment, a switch): the one writer.
        self.index_write_lock = threading.RLock()
        self.reports = ReportStore(self.layout.reports)
        # Queries: the active bundle (loaded once per process, shared with embedded-mode workers) and its
        # collection, swapped by the lifecycle; none yet = NoBundleError.
        self.query_engine = QueryEngine(settings, None, None, None, request_for=self._spooled_request,
                                        report_vector_for=self._report_vector_for)
        self.lifecycle = ModelLifecycle(settings, self.layout, self.store, open_catalog(settings, self.layout.index),
                                        self.reports, self.dispatcher, self.index_write_lock, self.query_engine)
        self.report_fanout = ReportFanout(self.reports, lambda: [s.reports for s in self.lifecycle.models.slots()],
                                          self.index_write_lock)
        self.scp = StorageSCP(settings, self.layout, self.store)
        self.scp.ingestor.reports = ReportReceiver(settings, self.reports, self.report_fanout.attach)
        self.delivery = DeliveryWorker(settings, self.store)
        self.pipeline = Pipeline(settings, self.layout, self.store, self.lifecycle, self.dispatcher,
                                 self.scp.studies_in_flight, index_lock=self.index_write_lock)
        self.lifecycle.request_for = (lambda uid, version, bundle_id, path:
                                      self.pipeline.embed_request(uid, version, bundle_id, path))
        self.lifecycle.open()
        self.scp.query_engine = self.query_engine  # similar-case C-FIND (dicom_node.query)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.http: ApiServer | None = None  # the REST API, started after the SCP (api.http_port 0: off)

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = reconcile_spool(self.layout, self.store, quiet_seconds=self.settings.node.quiet_seconds)
        if recovered:
            logger.info("event=spool_reconciled instances=%d", recovered)
        self.report_fanout.reconcile()
        swept = sweep_retention(self.settings, self.layout, self.store)  # what a crash left of retention.keep
        if swept:
            logger.info("event=retention_swept studies=%d", swept)
        self._threads = [
            threading.Thread(target=self._pipeline_loop, name="pipeline", daemon=True),
            threading.Thread(target=self.delivery.run_forever, args=(self._stop,), name="delivery", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.scp.start()
        self.http = start_api(self)
        logger.info("event=node_ready ae_title=%s bind=%s port=%d mode=%s bundle_id=%s data_dir=%s",
                    self.settings.node.ae_title, self.settings.node.bind, self.scp.port,
                    self.settings.workers.mode, self.bundle_id or "none", self.layout.root)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.scp.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.dispatcher.close()
        self.lifecycle.close()
        self.store.close()
        logger.info("event=node_stopped")

    def wait(self) -> None:
        """Block until ``stop()`` is called from another thread or a signal handler."""
        while not self._stop.wait(0.5):
            pass

    # --- the active bundle ---------------------------------------------------------------------------

    @property
    def active(self) -> BundleSlot | None:
        """The active bundle and its collection (None: no bundle yet)."""
        return self.lifecycle.models.active

    def _require_active(self) -> BundleSlot:
        active = self.active
        if active is None:
            raise NoBundleError()
        return active

    @property
    def bundle_id(self) -> str | None:
        active = self.active
        return active.bundle_id if active is not None else None

    @property
    def bundle_manifest(self) -> BundleManifest:
        return self._require_active().manifest

    @property
    def bundle(self) -> ModelBundle:
        return self._require_active().runtime

    @property
    def index(self) -> VectorIndex:
        return self._require_active().index

    @property
    def report_vectors(self) -> ReportVectors:
        return self._require_active().reports

    # --- reports and queries -----------------------------------------------------------------------

    def attach_report(self, study_uid: str, text: str, source: ReportSource) -> None:
        """Store or replace a study's report and, if the study is indexed, its ``report`` vector (in every
        collection the node keeps).

        ``source``: "dicom-sr" or "rest". Raises :class:`workers.search.QueryError` for an empty text or an
        invalid UID. The text is kept in ``<data_dir>/reports/`` only: never logged, never in the index payload.
        """
        self.report_fanout.attach(study_uid, text, source)

    def _report_vector_for(self, study_uid: str, bundle_id: str) -> list[float] | None:
        slot = self.lifecycle.models.slot_for(bundle_id)
        return slot.reports.vector_for(study_uid) if slot is not None else None

    def _spooled_request(self, study_uid: str) -> EmbedRequest | None:
        """An embed request for a study held in the spool (for on-the-fly query embedding), or None."""
        try:
            if not self.layout.study_files(study_uid):
                return None
        except InvalidUIDError:
            return None
        row = self.store.study(study_uid)
        try:
            return self.pipeline.embed_request(study_uid, row.version if row is not None else 0)
        except LookupError:  # no bundle yet
            return None

    # --- pipeline ---------------------------------------------------------------------------------

    def _pipeline_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pipeline.tick()
            except Exception:  # noqa: BLE001 - keep the node alive; the tick retries everything next time
                logger.exception("event=pipeline_error")
            self._stop.wait(self.settings.node.poll_interval_s)

    def pipeline_tick(self, now: float | None = None) -> None:
        """One pass of the pipeline (tests and tools drive it directly)."""
        self.pipeline.tick(now)
