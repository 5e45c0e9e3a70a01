"""The node's model lifecycle: which bundle serves, the first bundle arriving, reindex, switch and rollback.

Runs in the pipeline thread (:meth:`ModelLifecycle.tick`, once per pipeline pass), so it is part of the index's
one writer and never races the pipeline's own indexing.

* **Which bundle serves**: the index's active pointer (``workers.index.catalog``) — the collection that holds
  every study — not the registry's ``active.json``, which says what an operator asked for. At start: the pointer;
  else an index made before pointers (its collection records a bundle that is installed); else the registry's
  active bundle; else none.
* **No bundle yet**: the node receives and stores; the pipeline holds studies (quiet, not dispatched) and queries
  answer "no model bundle active yet". The registry is polled; once a bundle is activated (``medfinder bundle
  activate`` / ``install --activate``, another process) it is loaded, its collection made, the pointer written,
  and the waiting studies go through.
* **Reindex** (a job from ``medfinder reindex --bundle ID``, see ``jobs``): the target bundle becomes a follower
  (``follower``) that catches up with every indexed study while the active one serves; new arrivals reach it
  the same way. Caught up, the job *switches*: the pipeline holds new studies for a moment, the studies already
  being embedded or reported finish, the follower catches up with those, and then the pointer is written
  (atomic), the query engine swapped and the registry's ``active.json`` rewritten, in that order. The replaced
  collection stays a follower while ``reindex.keep_previous``, for a rollback (the same switch, back).
* **Resumable**: jobs and per-bundle members live in ``reindex.sqlite3``; a restarted node resumes an open job.
"""

from __future__ import annotations

import logging
import threading
import time

from config import Settings
from dicom_node.lifecycle.follower import FollowerSync, RequestFor, SyncProgress
from dicom_node.lifecycle.jobs import Job, JobKind, JobState, JobStore
from dicom_node.lifecycle.slots import BundleSlot, ModelSet, open_slot
from dicom_node.store.layout import NodeLayout
from dicom_node.store.reports import ReportStore
from dicom_node.store.state import StateStore, StudyState
from model_export.errors import BundleError
from model_export.registry import activate_bundle, active_bundle_id, find_bundle
from workers.dispatch import Dispatcher
from workers.index import IndexMismatchError
from workers.index.catalog import ActivePointer, CollectionRef, IndexCatalog
from workers.search import QueryEngine

logger = logging.getLogger(__name__)

INDEXED_STATES = (StudyState.INDEXED, StudyState.REPORTED, StudyState.BACKFILLED)
RETIRE_AFTER_S = 60.0  # a collection switched away from is closed this long after (queries may still hold it)
LOAD_RETRY_S = 30.0  # a bundle that failed to load is tried again after this long (or when the registry changes)
REGISTRY_POLL_S = 1.0  # how often a node without a bundle (or with a changed registry) looks at active.json
JOBS_POLL_S = 0.5  # how often the job table is read for requests and cancels
# With no job open and every follower in step (the previous collection kept for a rollback), the followers are
# checked this often instead of every pass: the check reads every study row.
IDLE_SYNC_S = 2.0


class ModelLifecycle:
    """Owns the :class:`ModelSet`; the pipeline asks it each pass what to embed with and whether to hold."""

    def __init__(self, settings: Settings, layout: NodeLayout, store: StateStore, catalog: IndexCatalog,
                 reports: ReportStore, dispatcher: Dispatcher, index_write_lock: threading.RLock,
                 engine: QueryEngine) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.catalog = catalog
        self.reports = reports
        self.dispatcher = dispatcher
        self.index_write_lock = index_write_lock
        self.engine = engine
        self.jobs = JobStore(layout.root)
        self.models = ModelSet()
        self.request_for: RequestFor | None = None  # the pipeline's request builder, set by the node
        self.pointer: ActivePointer | None = None  # as last read or written
        self._syncs: dict[str, FollowerSync] = {}
        self._job: Job | None = None
        self._registry_seen: str | None = None
        self._load_retry_at = 0.0  # after a bundle failed to load: not before this (monotonic)
        self._retiring: list[tuple[float, BundleSlot]] = []  # (close after, slot): collections no longer served
        self._next_registry = 0.0
        self._next_jobs = 0.0
        self._said_waiting = False
        self._next_idle_sync = 0.0
        self._idle = False  # every follower in step and no job open
        self._last_progress: tuple[int, int, int, int] | None = None

    # --- start ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Load what serves (see the module docstring) and the previous collection if kept; never waits."""
        pointer = self.catalog.read_pointer()
        registry = active_bundle_id(self.settings)
        self._registry_seen = registry
        if pointer is None:
            pointer = self._adopt(registry)
        self.pointer = pointer
        if pointer is None:
            logger.warning("event=no_active_bundle message=%r", "no active bundle yet: receiving and storing; "
                           "studies are embedded once a bundle is activated (medfinder bundle activate ID)")
            return
        active = self._open(pointer.active.bundle_id, pointer.active.name)
        followers: tuple[BundleSlot, ...] = ()
        if pointer.previous is not None and self.settings.reindex.keep_previous:
            try:
                followers = (self._open(pointer.previous.bundle_id, pointer.previous.name),)
            except (BundleError, IndexMismatchError) as error:  # the node serves all the same
                logger.warning("event=previous_collection_unavailable bundle_id=%s error=%s",
                               pointer.previous.bundle_id, error)
        self._set(ModelSet(active, followers))
        if registry is not None and registry != active.bundle_id:
            self._registry_differs(registry)

    def _adopt(self, registry: str | None) -> ActivePointer | None:
        """The first pointer: an index made before pointers if its bundle is installed, else the registry's."""
        base = self.settings.index.collection
        found = self.catalog.bundle_of(base)
        if found is not None:
            try:
                find_bundle(self.settings, found)
            except BundleError:
                logger.warning("event=old_collection_skipped collection=%s bundle_id=%s reason=not_installed", base,
                               found)
            else:
                pointer = ActivePointer(CollectionRef(base, found))
                self.catalog.write_pointer(pointer)
                return pointer
        if registry is None:
            return None
        pointer = ActivePointer(CollectionRef(self.catalog.collection_for(registry), registry))
        self.catalog.write_pointer(pointer)
        return pointer

    def _open(self, bundle_id: str, collection: str | None = None) -> BundleSlot:
        return open_slot(self.settings, self.catalog, bundle_id, self.reports, self.index_write_lock, collection)

    def _set(self, models: ModelSet) -> None:
        """Replace the model set and the query engine's serving pair (the engine first sees the new set)."""
        self.models = models
        if models.active is not None:
            self.engine.swap(models.active.index, models.active.runtime, models.active.bundle_id)
        self._syncs = {slot.bundle_id: self._syncs.get(slot.bundle_id) or self._sync_for(slot)
                       for slot in models.followers}

    def _sync_for(self, slot: BundleSlot) -> FollowerSync:
        assert self.request_for is not None, "the node sets request_for before the pipeline runs"
        return FollowerSync(self.settings, self.layout, slot, self.jobs, self.dispatcher, self.request_for,
                            self.index_write_lock)

    # --- what the pipeline asks -------------------------------------------------------------------------

    @property
    def hold_new_studies(self) -> bool:
        """True while no bundle is active, or while a switch waits for the studies in progress to finish."""
        return self.models.active is None or (self._job is not None and self._job.state == JobState.SWITCHING)

    @property
    def switching(self) -> bool:
        return self._job is not None and self._job.state == JobState.SWITCHING

    def close(self) -> None:
        for slot in (*self.models.slots(), *(slot for _when, slot in self._retiring)):
            slot.index.close()
        self._retiring = []
        self.catalog.close()
        self.jobs.close()

    # --- one pass ---------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._retiring:
            self._close_retired()
        if now >= self._next_registry:
            self._next_registry = now + REGISTRY_POLL_S
            self._watch_registry()
        if now >= self._next_jobs:
            self._next_jobs = now + JOBS_POLL_S
            self._read_jobs(now)
        progress = self._sync_followers(now)
        job = self._job
        if job is None:
            return
        if job.kind == JobKind.REINDEX:
            assert job.bundle_id is not None
            target = progress.get(job.bundle_id)
            self._progress(job, target, now)
            if job.state == JobState.RUNNING and target is not None and target.in_sync:
                self._move(job, JobState.SWITCHING)
            if self.switching and target is not None and target.in_sync and self._drained():
                self._switch(job, job.bundle_id)
        else:
            previous = self._previous()
            state = progress.get(previous) if previous else None
            self._progress(job, state, now)
            if job.state == JobState.RUNNING and state is not None and state.in_sync:
                self._move(job, JobState.SWITCHING)
            if self.switching and previous and state is not None and state.in_sync and self._drained():
                self._switch(job, previous)

    def _watch_registry(self) -> None:
        try:
            registry = active_bundle_id(self.settings)
        except BundleError as error:
            logger.warning("event=registry_unreadable error=%s", error)
            return
        if self.models.active is None:
            if registry is None:
                return
            if registry == self._registry_seen and time.monotonic() < self._load_retry_at:
                return  # it failed to load a moment ago: an ONNX load per second would starve the pipeline
            try:
                slot = self._open(registry)
            except (BundleError, IndexMismatchError) as error:
                if registry != self._registry_seen:
                    logger.error("event=bundle_load_failed bundle_id=%s error=%s", registry, error)
                self._registry_seen = registry
                self._load_retry_at = time.monotonic() + LOAD_RETRY_S
                return
            with self.index_write_lock:
                self.pointer = ActivePointer(slot.ref)
                self.catalog.write_pointer(self.pointer)
                self._set(ModelSet(slot))
            self._registry_seen = registry
            logger.info("event=bundle_activated bundle_id=%s collection=%s message=%r", slot.bundle_id,
                        slot.collection, "embedding the studies received so far")
            self.reports_reconcile()
            return
        if registry != self._registry_seen:
            self._registry_seen = registry
            if registry is not None and registry != self.models.active.bundle_id:
                self._registry_differs(registry)

    def reports_reconcile(self) -> None:
        for slot in self.models.slots():
            slot.reports.reconcile()

    def _registry_differs(self, registry: str) -> None:
        active = self.models.active
        assert active is not None
        logger.warning("event=registry_bundle_differs registry_bundle_id=%s serving_bundle_id=%s message=%r",
                       registry, active.bundle_id, "the node keeps serving its collection; `medfinder reindex "
                       f"--bundle {registry[:12]}` embeds every study with it and switches without downtime")

    # --- jobs -------------------------------------------------------------------------------------------

    def _read_jobs(self, now: float) -> None:
        current = self._job
        if current is not None:
            fresh = self.jobs.job(current.id)
            if fresh is not None and not fresh.open:  # cancelled by the command
                logger.info("event=reindex_%s job=%d", fresh.state.value, fresh.id)
                self._job = None
                if fresh.kind == JobKind.REINDEX and fresh.bundle_id:
                    self._drop_follower(fresh.bundle_id)
            return
        job = self.jobs.open_job()
        if job is None:
            return
        if self.models.active is None:
            if job.state == JobState.REQUESTED and not self._said_waiting:
                logger.warning("event=reindex_waiting job=%d reason=no_active_bundle", job.id)
                self._said_waiting = True
            return
        self._start(job, now)

    def _start(self, job: Job, now: float) -> None:
        active = self.models.active
        assert active is not None
        if job.kind == JobKind.REINDEX:
            assert job.bundle_id is not None
            if job.bundle_id == active.bundle_id:
                self.jobs.move(job.id, JobState.DONE, message=f"bundle {job.bundle_id} is already active")
                return
            follower = self.models.follower(job.bundle_id)
            if follower is None:
                try:
                    follower = self._open(job.bundle_id)
                except (BundleError, IndexMismatchError) as error:
                    self.jobs.move(job.id, JobState.FAILED, message=str(error))
                    logger.error("event=reindex_failed job=%d bundle_id=%s error=%s", job.id, job.bundle_id, error)
                    return
                with self.index_write_lock:
                    self._set(ModelSet(active, (*self.models.followers, follower)))
        elif self._previous() is None:
            self.jobs.move(job.id, JobState.FAILED, message="no previous collection to roll back to (none was "
                           "kept: reindex.keep_previous, or no reindex has switched yet)")
            return
        state = job.state if job.state != JobState.REQUESTED else JobState.RUNNING
        self.jobs.move(job.id, state, from_bundle=active.bundle_id)
        self._job = self.jobs.job(job.id)
        logger.info("event=reindex_started job=%d kind=%s bundle_id=%s from_bundle_id=%s", job.id, job.kind.value,
                    job.bundle_id or self._previous(), active.bundle_id)

    def _move(self, job: Job, state: JobState, message: str | None = None) -> None:
        if self.jobs.move(job.id, state, message=message):
            self._job = self.jobs.job(job.id)
            if state == JobState.SWITCHING:
                logger.info("event=reindex_caught_up job=%d message=%r", job.id,
                            "holding new studies until those in progress are done, then switching")

    def _drop_follower(self, bundle_id: str) -> None:
        """A cancelled reindex: stop embedding for the target (its collection stays; a new reindex resumes it)."""
        slot = self.models.follower(bundle_id)
        if slot is None or bundle_id == self._previous():
            return
        with self.index_write_lock:
            self._set(ModelSet(self.models.active, tuple(f for f in self.models.followers if f is not slot)))
        self._retire(slot)

    def _retire(self, slot: BundleSlot) -> None:
        """Close a collection no longer served, after queries that started on it had time to finish."""
        self._retiring.append((time.monotonic() + RETIRE_AFTER_S, slot))

    def _close_retired(self) -> None:
        now = time.monotonic()
        due = [slot for when, slot in self._retiring if when <= now]
        self._retiring = [(when, slot) for when, slot in self._retiring if when > now]
        for slot in due:
            slot.index.close()

    def _previous(self) -> str | None:
        """The previous collection's bundle when it is kept (loaded as a follower)."""
        previous = self.pointer.previous if self.pointer is not None else None
        if previous is None or self.models.follower(previous.bundle_id) is None:
            return None
        return previous.bundle_id

    # --- followers and the switch -------------------------------------------------------------------------

    def indexed_versions(self) -> dict[str, int]:
        """Study UID -> result version of every study the active collection holds."""
        return self.store.indexed_versions(INDEXED_STATES)

    def _sync_followers(self, now: float) -> dict[str, SyncProgress]:
        if not self._syncs:
            return {}
        if self._idle and self._job is None and now < self._next_idle_sync:
            return {}
        self._next_idle_sync = now + IDLE_SYNC_S
        wanted = self.indexed_versions()
        progress = {bundle_id: sync.step(wanted, now) for bundle_id, sync in self._syncs.items()}
        self._idle = all(state.in_sync for state in progress.values())
        return progress

    def _progress(self, job: Job, state: SyncProgress | None, now: float) -> None:
        """Write a job's counts when they changed (the command polls them)."""
        if state is None:
            return
        values = (job.id, state.total, state.done, state.failed)
        if values != self._last_progress:
            self._last_progress = values
            self.jobs.progress(job.id, state.total, state.done, state.failed, now)

    def _drained(self) -> bool:
        """No study being embedded or waiting for its report by the active bundle."""
        return not self.store.queued_studies() and not self.store.indexed_studies()

    def _switch(self, job: Job, to_bundle: str) -> None:
        """The atomic switch: pointer, then the serving pair, then the registry (see the module docstring)."""
        old = self.models.active
        new = self.models.follower(to_bundle)
        assert old is not None and new is not None
        keep = self.settings.reindex.keep_previous
        with self.index_write_lock:
            # Every study indexed so far is in the outgoing collection (the pipeline put it there): record it, so a
            # later rollback or reindex knows what that collection holds.
            self.jobs.record_indexed(old.bundle_id, self.indexed_versions().items())
            self.pointer = ActivePointer(new.ref, old.ref if keep else None)
            self.catalog.write_pointer(self.pointer)
            others = tuple(f for f in self.models.followers if f is not new and f is not old)
            self._set(ModelSet(new, (old, *others)[:1] if keep else ()))
        for dropped in (*others, *(() if keep else (old,))):
            self._retire(dropped)
        try:
            activate_bundle(self.settings, new.bundle_id)
        except BundleError as error:  # the pointer has switched; a restart serves it all the same
            logger.error("event=registry_activate_failed bundle_id=%s error=%s", new.bundle_id, error)
        self._registry_seen = new.bundle_id
        self.jobs.move(job.id, JobState.DONE, message=f"serving {new.bundle_id} (collection {new.collection})")
        self._job = None
        logger.info("event=bundle_switched job=%d kind=%s bundle_id=%s collection=%s previous_bundle_id=%s kept=%s",
                    job.id, job.kind.value, new.bundle_id, new.collection, old.bundle_id, keep)

