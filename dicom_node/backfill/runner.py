"""The backfill loop: query the range day by day, then fetch each study not yet complete, paced, and check what
arrived in the node's state store.

A study is complete when the node holds at least as many instances as the source reported for it, or when the
fetch reported every sub-operation complete with no failure and the node holds what it keeps of it (the node
keeps CT storage only, so a study with, say, a dose report holds fewer). A complete study is never asked for
again; one the node already holds in full (routed there before) is recorded complete without being asked for.
Before a study is asked for, its reports are suppressed in the node's store (``backfill`` source) unless
``report``: the node indexes it like any other study and finishes it as ``backfilled`` without an SR.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol, TextIO

from dicom_node.backfill.dimse import FetchResult
from dicom_node.backfill.progress import (
    BackfillState,
    BackfillStore,
    BackfillStudy,
    StudyHit,
)
from dicom_node.backfill.schedule import Pacer, days
from dicom_node.store.state import StateStore

logger = logging.getLogger(__name__)

SOURCE_NAME = "backfill"  # the node's reports_suppressed source
SETTLE_S = 2.0  # after a clean fetch, how long the held count may stay still before it is taken as final


class Source(Protocol):
    label: str

    def find_day(self, day: date, modality: str) -> list[StudyHit]: ...

    def fetch(self, hit: StudyHit) -> FetchResult: ...


@dataclass
class BackfillRequest:
    since: date
    until: date
    modality: str
    method: str
    limit: int | None = None
    dry_run: bool = False
    report: bool = False
    arrival_timeout_s: float = 600.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackfillSummary:
    run_id: int
    found: int = 0
    already_complete: int = 0
    asked: int = 0
    completed: int = 0
    incomplete: int = 0
    seconds: float = 0.0

    @property
    def studies_per_min(self) -> float:
        return 60.0 * self.asked / self.seconds if self.seconds > 0 else 0.0


def held_instances(node_store: StateStore | None, study_uid: str) -> int:
    """Instances of the study the node's state store holds (0 when it has none, or no store in a dry run)."""
    if node_store is None:
        return 0
    row = node_store.study(study_uid)
    return int(row.n_instances) if row is not None else 0


class Backfill:
    """One run: ``run()`` queries, then fetches; ``out`` gets the progress bar and the operator's lines."""

    def __init__(self, request: BackfillRequest, source: Source, store: BackfillStore, node_store: StateStore | None,
                 pacer: Pacer, out: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic) -> None:
        self.request = request
        self.source = source
        self.store = store
        self.node_store = node_store
        self.pacer = pacer
        self.out = out
        self.clock = clock

    def say(self, line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line, file=self.out)

    # --- query ----------------------------------------------------------------------------------------

    def query(self, run_id: int) -> None:
        """C-FIND (or REST find) every day of the range not queried since it ended; progress per day."""
        from tqdm import tqdm

        request = self.request
        all_days = list(days(request.since, request.until))
        todo = [d for d in all_days if not self.store.day_done(self.source.label, d, request.modality)]
        if len(todo) < len(all_days):
            self.say(f"{len(all_days) - len(todo)} of {len(all_days)} day(s) already queried in an earlier run")
        found = 0
        with tqdm(todo, desc="query days", unit="day", file=self.out, disable=not todo) as bar:
            for day in bar:
                hits = self.source.find_day(day, request.modality)
                self.store.record_day(self.source.label, day, request.modality, hits, run_id)
                found += len(hits)
                bar.set_postfix_str(f"{found} {request.modality or 'any'} studies")
        logger.info("event=backfill_queried source=%s days=%d queried=%d found=%d", self.source.label,
                    len(all_days), len(todo), found)

    # --- fetch ----------------------------------------------------------------------------------------

    def run(self) -> BackfillSummary:
        request = self.request
        run_id = self.store.start_run(self.source.label, request.method, request.since, request.until,
                                      request.modality, {**request.options, "dry_run": request.dry_run,
                                                         "report": request.report, "limit": request.limit})
        summary = BackfillSummary(run_id)
        outcome = "interrupted"
        try:
            self.query(run_id)
            studies = self.store.studies(self.source.label, request.since, request.until)
            summary.found = len(studies)
            pending = []
            for study in studies:
                if study.state == BackfillState.COMPLETE:
                    summary.already_complete += 1
                    continue
                held = held_instances(self.node_store, study.study_uid)
                if study.expected is not None and held >= study.expected and held > 0:
                    summary.already_complete += 1
                    if not request.dry_run:
                        self.store.mark_done(study.study_uid, run_id, complete=True, held=held,
                                             reason="already held by the node (not asked for)")
                    continue
                pending.append(study)
            if request.limit is not None:
                pending = pending[:request.limit]
            self.say(f"backfill from {self.source.label}, {request.since:%Y%m%d}-{request.until:%Y%m%d}, "
                     f"{request.modality or 'any modality'}: {summary.found} studies found, "
                     f"{summary.already_complete} complete already, {len(pending)} to fetch ({request.method})")
            if request.dry_run:
                for study in pending:
                    held = held_instances(self.node_store, study.study_uid)
                    self.say(f"would fetch {study.study_date} {study.study_uid} "
                             f"{'/'.join(study.modalities) or '?'} instances={study.expected if study.expected is not None else '?'}"
                             f" held={held} state={study.state.value}")
                outcome = "dry-run"
                return summary
            self._fetch_all(pending, run_id, summary)
            outcome = "complete" if summary.incomplete == 0 else "incomplete"
            return summary
        finally:
            self.store.finish_run(run_id, outcome)

    def _fetch_all(self, pending: list[BackfillStudy], run_id: int, summary: BackfillSummary) -> None:
        from tqdm import tqdm

        started = self.clock()
        with tqdm(total=len(pending), desc="backfill", unit="study", file=self.out, disable=not pending) as bar:
            for study in pending:
                self.pacer.wait()
                complete = self._fetch_one(study, run_id)
                summary.asked += 1
                summary.completed += complete
                summary.incomplete += not complete
                summary.seconds = self.clock() - started
                bar.update(1)
                bar.set_postfix_str(f"{summary.studies_per_min:.1f} studies/min, {summary.incomplete} incomplete")
        summary.seconds = self.clock() - started

    def _fetch_one(self, study: BackfillStudy, run_id: int) -> bool:
        if not self.request.report:
            assert self.node_store is not None
            self.node_store.suppress_reports([study.study_uid], SOURCE_NAME)
        self.store.mark_asked(study.study_uid, run_id)
        logger.info("event=backfill_asked study_uid=%s expected=%s attempt=%d", study.study_uid, study.expected,
                    study.attempts + 1)
        try:
            result = self.source.fetch(study.hit())
        except Exception as error:  # noqa: BLE001 - one study's failure is recorded, the run goes on
            held = held_instances(self.node_store, study.study_uid)
            reason = f"{type(error).__name__}: {str(error)[:300]}"
            self.store.mark_done(study.study_uid, run_id, complete=False, held=held, reason=reason)
            self.say(f"study {study.study_uid}: fetch failed ({reason}); it is retried by the next run")
            return False
        held = self._await_arrival(study, result)
        if not self.request.report:  # the node's suppression window counts from the last arrival, not the ask
            self.node_store.suppress_reports([study.study_uid], SOURCE_NAME)
        target = study.expected if study.expected is not None else result.completed
        complete = held >= max(target, 1) or (result.ok and held > 0)
        reason = None
        if not complete:
            reason = (f"node holds {held} of {target} instance(s); fetch status 0x{result.status & 0xFFFF:04X}, "
                      f"{result.completed} completed, {result.failed} failed {result.comment}").rstrip()
            self.say(f"study {study.study_uid}: incomplete ({reason}); it is retried by the next run")
        self.store.mark_done(study.study_uid, run_id, complete=complete, held=held, sub_completed=result.completed,
                             sub_failed=result.failed, reason=reason)
        logger.info("event=backfill_fetched study_uid=%s complete=%s held=%d expected=%s completed=%d failed=%d",
                    study.study_uid, complete, held, study.expected, result.completed, result.failed)
        return complete

    def _await_arrival(self, study: BackfillStudy, result: FetchResult) -> int:
        """The held count once it reaches the expected count or stops growing for ``SETTLE_S``.

        A conforming PACS completes every C-MOVE sub-operation before its final response, so the count is final
        at once; a PACS that reports success before anything arrived (it sends later) gets ``arrival_timeout_s``
        for its first instance.
        """
        target = study.expected if study.expected is not None else result.completed
        held = held_instances(self.node_store, study.study_uid)
        last_change = self.clock()
        while held < target:
            patience = self.request.arrival_timeout_s if result.ok and held == 0 else SETTLE_S
            if self.clock() - last_change >= patience:
                break
            time.sleep(0.2)
            now_held = held_instances(self.node_store, study.study_uid)
            if now_held != held:
                held, last_change = now_held, self.clock()
        return held
