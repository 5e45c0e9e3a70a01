"""The running node: receive, store, pipeline, report and deliver, wired together in one place.

Threads: pynetdicom's association threads (receive only: validate, spool, record); one *pipeline* thread
(:class:`~dicom_node.pipeline.Pipeline`: fires quiet studies, collects worker outcomes, indexes them and builds
SRs); one *delivery* thread (C-STORE of SRs with bounded retries). Embedding runs on the dispatcher: a thread
pool in embedded mode, Celery workers in distributed mode. The node is the index's only writer: the pipeline's
indexing and report attachment (an SR's association thread, a REST request) each hold ``index_write_lock``
around their read-and-upsert (:mod:`dicom_node.pipeline.report_vectors`); queries (``query_engine``) only read.

Restart safety: the spool is reconciled with the state store at start, and the pipeline reads everything it
acts on back from both on every tick (see :mod:`dicom_node.pipeline.pipeline`).
"""

from __future__ import annotations

import logging
import threading

from config import Settings
from dicom_node.api.server import ApiServer
from dicom_node.api.wiring import start_api
from dicom_node.deliver.delivery import DeliveryWorker
from dicom_node.pipeline import Pipeline
from dicom_node.pipeline.report_vectors import ReportVectors
from dicom_node.receive.ingest import reconcile_spool
from dicom_node.receive.report_sr import ReportReceiver
from dicom_node.receive.scp import StorageSCP
from dicom_node.store.layout import NodeLayout
from dicom_node.store.reports import ReportSource, ReportStore
from dicom_node.store.state import StateStore
from model_export.bundle_manifest import BundleManifest, read_manifest
from model_export.registry import active_bundle_path
from workers.dicom_uids import InvalidUIDError
from workers.dispatch import Dispatcher, make_dispatcher
from workers.embed_study import bundle_for
from workers.handoff import EmbedRequest
from workers.index import VectorIndex, open_index
from workers.search import QueryEngine

logger = logging.getLogger(__name__)


class Node:
    """One MedFinder node; ``start()`` returns once it accepts associations, ``stop()`` shuts it down."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher | None = None) -> None:
        self.settings = settings
        self.layout = NodeLayout.create(settings.paths.data_dir)
        self.layout.pseudonym_key()  # made here, before any worker needs it
        self.bundle_manifest: BundleManifest = read_manifest(active_bundle_path(settings))
        self.bundle_id = self.bundle_manifest.bundle_id
        self.store = StateStore(self.layout.state_db)
        self.index: VectorIndex = open_index(settings, self.layout.index)
        self.index.ensure_collection(self.bundle_id, self.bundle_manifest.embedding_dim)
        self.dispatcher = dispatcher or make_dispatcher(settings)
        # The active bundle, loaded once per process (shared with embedded-mode workers): text queries, report
        # embeddings and on-the-fly study embeddings.
        self.bundle = bundle_for(settings, self.bundle_id)
        # Every index write holds this lock (pipeline indexing, report attachment): the node is the one writer.
        self.index_write_lock = threading.RLock()
        self.reports = ReportStore(self.layout.reports)
        self.report_vectors = ReportVectors(self.reports, self.index, self.bundle, self.index_write_lock)
        self.scp = StorageSCP(settings, self.layout, self.store)
        self.scp.ingestor.reports = ReportReceiver(settings, self.reports, self.report_vectors.attach)
        self.delivery = DeliveryWorker(settings, self.store)
        self.pipeline = Pipeline(settings, self.layout, self.store, self.index, self.dispatcher,
                                 self.bundle_manifest, self.scp.studies_in_flight, index_lock=self.index_write_lock,
                                 report_vector_for=self.report_vectors.vector_for)
        self.query_engine = QueryEngine(settings, self.index, self.bundle, self.bundle_id,
                                        request_for=self._spooled_request,
                                        report_vector_for=self.report_vectors.vector_for)
        self.scp.query_engine = self.query_engine  # similar-case C-FIND (dicom_node.query)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.http: ApiServer | None = None  # the REST API, started after the SCP (api.http_port 0: off)

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        recovered = reconcile_spool(self.layout, self.store, quiet_seconds=self.settings.node.quiet_seconds)
        if recovered:
            logger.info("event=spool_reconciled instances=%d", recovered)
        self.report_vectors.reconcile()
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
                    self.settings.workers.mode, self.bundle_id, self.layout.root)

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
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

    # --- reports and queries -----------------------------------------------------------------------

    def attach_report(self, study_uid: str, text: str, source: ReportSource) -> None:
        """Store or replace a study's report and, if the study is indexed, its ``report`` vector.

        ``source``: "dicom-sr" or "rest". Raises :class:`workers.search.QueryError` for an empty text or an
        invalid UID. The text is kept in ``<data_dir>/reports/`` only: never logged, never in the index payload.
        """
        self.report_vectors.attach(study_uid, text, source)

    def _spooled_request(self, study_uid: str) -> EmbedRequest | None:
        """An embed request for a study held in the spool (for on-the-fly query embedding), or None."""
        try:
            if not self.layout.study_files(study_uid):
                return None
        except InvalidUIDError:
            return None
        row = self.store.study(study_uid)
        return self.pipeline.embed_request(study_uid, row.version if row is not None else 0)

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
