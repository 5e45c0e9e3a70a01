"""Keep a follower collection in step with the active one: every indexed study, embedded by the follower's bundle.

This one mechanism is the reindex (a new collection starts empty and catches up), "new arrivals are embedded for
both" (a study the active collection indexes is behind in every follower until it is embedded there too) and the
previous collection kept for a rollback. It runs in the pipeline thread, the index's one writer.

Work per tick: collect the outcomes that arrived (upsert with the study's report vector by the follower's bundle,
record the member), re-dispatch the overdue ones, and dispatch more up to ``reindex.batch`` in flight at the
reindex priority (new arrivals go first on the workers). Follower outcomes are written beside the study's own
(``outcomes/<study>/v<N>.<bundle id[:12]>.json``) and removed once indexed: the member table records the result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from config import Settings
from dicom_node.lifecycle.jobs import JobStore, MemberState
from dicom_node.lifecycle.slots import BundleSlot
from dicom_node.pipeline.indexing import index_outcome
from dicom_node.store.layout import NodeLayout
from workers.dispatch import PRIORITY_REINDEX, Dispatcher
from workers.handoff import EmbedRequest, EmbedStatus, read_outcome
from workers.index.catalog import ID_CHARS

logger = logging.getLogger(__name__)

# (study UID, version, bundle id, outcome path) -> the request (the pipeline's, so every request is made alike)
RequestFor = Callable[[str, int, str, Path], EmbedRequest]


@dataclass
class _InFlight:
    version: int
    dispatched_at: float


def follower_outcome_path(layout: NodeLayout, study_uid: str, version: int, bundle_id: str) -> Path:
    """Where a follower's outcome of one study version goes (beside the study's own outcome)."""
    own = layout.outcome_path(study_uid, version)
    return own.with_name(f"v{int(version)}.{bundle_id[:ID_CHARS]}.json")


@dataclass(frozen=True)
class SyncProgress:
    """How far a follower is: of ``total`` indexed studies, ``done`` are handled (``failed`` of them without a
    vector in the follower), ``in_flight`` being embedded."""

    total: int
    done: int
    failed: int
    in_flight: int

    @property
    def in_sync(self) -> bool:
        return self.done >= self.total and self.in_flight == 0


class FollowerSync:
    """One follower collection catching up with the studies the node has indexed."""

    def __init__(self, settings: Settings, layout: NodeLayout, slot: BundleSlot, jobs: JobStore,
                 dispatcher: Dispatcher, request_for: RequestFor, index_lock: threading.RLock) -> None:
        self.settings = settings
        self.layout = layout
        self.slot = slot
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.request_for = request_for
        self.index_lock = index_lock
        self.members = jobs.members(slot.bundle_id)  # study UID -> (version, state), kept in step with the table
        self._in_flight: dict[str, _InFlight] = {}

    @property
    def bundle_id(self) -> str:
        return self.slot.bundle_id

    def step(self, wanted: Mapping[str, int], now: float) -> SyncProgress:
        """One pass; ``wanted``: study UID -> the version the active collection holds."""
        for study_uid, flight in list(self._in_flight.items()):
            if wanted.get(study_uid) != flight.version:
                self._in_flight.pop(study_uid)  # superseded (re-sent) meanwhile: the newer version comes next
                continue
            overdue = now - flight.dispatched_at > self.settings.workers.redispatch_after_s
            if not self._collect(study_uid, flight.version) and overdue:
                logger.warning("event=reindex_redispatch bundle_id=%s study_uid=%s version=%d", self.bundle_id,
                               study_uid, flight.version)
                flight.dispatched_at = now
                self._dispatch(study_uid, flight.version)
        behind = [uid for uid, version in wanted.items()
                  if self._member_version(uid) != version and uid not in self._in_flight]
        room = self.settings.reindex.batch - len(self._in_flight)
        for study_uid in behind:
            if room <= 0:
                break
            version = wanted[study_uid]
            if self._collect(study_uid, version):  # written before a restart: nothing to embed again
                continue
            self._in_flight[study_uid] = _InFlight(version, now)
            self._dispatch(study_uid, version)
            room -= 1
        done = failed = 0
        for uid, version in wanted.items():
            member = self.members.get(uid)
            if member is not None and member[0] == version:
                done += 1
                failed += member[1] != MemberState.EMBEDDED
        return SyncProgress(len(wanted), done, failed, len(self._in_flight))

    def _member_version(self, study_uid: str) -> int | None:
        member = self.members.get(study_uid)
        return member[0] if member is not None else None

    def _dispatch(self, study_uid: str, version: int) -> None:
        path = follower_outcome_path(self.layout, study_uid, version, self.bundle_id)
        try:
            self.dispatcher.submit(self.request_for(study_uid, version, self.bundle_id, path), PRIORITY_REINDEX)
        except Exception as error:  # noqa: BLE001 - broker down: the redispatch timer tries again
            logger.error("event=reindex_dispatch_failed bundle_id=%s study_uid=%s error=%r", self.bundle_id,
                         study_uid, error)

    def _collect(self, study_uid: str, version: int) -> bool:
        """Index the follower's outcome of this version if it is there; True when the study is handled."""
        path = follower_outcome_path(self.layout, study_uid, version, self.bundle_id)
        outcome = read_outcome(path)
        if outcome is None:
            return False
        self._in_flight.pop(study_uid, None)
        reason = outcome.reason
        if outcome.status == EmbedStatus.EMBEDDED:
            try:
                with self.index_lock:  # the report read and the upsert together, against a report arriving now
                    report = self.slot.reports.vector_for(study_uid)
                    index_outcome(self.slot.index, study_uid, outcome, report)
                state = MemberState.EMBEDDED
            except Exception as error:  # noqa: BLE001 - recorded as a member that failed; the job reports it
                logger.exception("event=reindex_index_failed bundle_id=%s study_uid=%s", self.bundle_id, study_uid)
                state, reason = MemberState.FAILED, f"indexing: {error!r}"
        else:
            state = MemberState.NOT_EMBEDDED if outcome.status == EmbedStatus.NOT_EMBEDDED else MemberState.FAILED
            logger.warning("event=reindex_study_%s bundle_id=%s study_uid=%s reason=%r", state.value, self.bundle_id,
                           study_uid, reason)
        self.jobs.record_member(self.bundle_id, study_uid, version, state, reason)
        self.members[study_uid] = (version, state)
        path.unlink(missing_ok=True)
        return True

