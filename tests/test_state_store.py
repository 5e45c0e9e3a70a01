"""The node's state store: study life cycle, quiet timers, result versions, deliveries — and what survives a
reopen (the node's restart)."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import CTImageStorage

from dicom_node.pipeline.batching import batch_mates_pending
from dicom_node.store.state import DeliveryState, InstanceRecord, StateStore, StudyState

STUDY = "1.2.3"


def record(sop: str, study: str = STUDY, series: str = "1.2.3.4") -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=CTImageStorage,
                          transfer_syntax="1.2.840.10008.1.2", path=Path(f"/spool/{sop}.dcm"), size=10)


def test_quiet_timer_in_flight_associations_and_versions(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    assert store.record_instance(record("1.1"), "PACS", "127.0.0.1", quiet_seconds=5, now=100.0)
    assert store.record_instance(record("1.2"), "PACS", "127.0.0.1", quiet_seconds=5, now=101.0)
    assert not store.record_instance(record("1.2"), "PACS", "127.0.0.1", quiet_seconds=5, now=102.0), "a re-send"
    assert store.study(STUDY).n_instances == 2 and store.study(STUDY).last_received == 101.0

    assert store.due_studies(105.9, set(), max_open_wait_s=600) == []
    assert store.due_studies(106.0, {STUDY}, max_open_wait_s=600) == [], "its association is still open"
    assert [s.study_uid for s in store.due_studies(106.0, set(), max_open_wait_s=600)] == [STUDY]
    assert [s.study_uid for s in store.due_studies(701.0, {STUDY}, max_open_wait_s=600)] == [STUDY]

    assert store.mark_queued(STUDY, "bundle", now=106.0) == 1
    assert store.mark_queued(STUDY, "bundle", now=106.1) is None, "already queued"
    assert store.finish(STUDY, 1, StudyState.INDEXED, point_id="p", series_uid="1.2.3.4")
    assert store.finish(STUDY, 1, StudyState.REPORTED)
    row = store.study(STUDY)
    assert (row.state, row.version, row.point_id, row.series_uid) == (StudyState.REPORTED, 1, "p", "1.2.3.4")

    # A new instance after the result: receiving again, and the next version is 2.
    assert store.record_instance(record("1.3"), "PACS", "127.0.0.1", quiet_seconds=5, now=200.0)
    assert store.study(STUDY).state == StudyState.RECEIVING
    assert store.mark_queued(STUDY, "bundle", now=205.0) == 2
    # Version 1's late outcome must not overwrite version 2.
    assert not store.finish(STUDY, 1, StudyState.FAILED, reason="stale")
    store.close()

    reopened = StateStore(tmp_path / "state.sqlite3")
    row = reopened.study(STUDY)
    assert (row.state, row.version, row.n_instances) == (StudyState.QUEUED, 2, 3)
    assert [s.study_uid for s in reopened.queued_studies()] == [STUDY]


def test_deliveries_are_unique_bounded_and_retryable(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    for _ in range(2):  # the same SR to the same destination twice is one delivery
        store.add_delivery(STUDY, 1, "9.9", Path("/r/9.9.dcm"), "PACS@h:104", "PACS", "h", 104, now=10.0)
    (delivery,) = store.due_deliveries(10.0)
    assert store.delivery_attempted(delivery.id, delivered=False, status="no-association", error="refused",
                                    next_attempt_at=12.0, now=10.0) == DeliveryState.PENDING
    assert store.due_deliveries(11.0) == [] and len(store.due_deliveries(12.0)) == 1
    assert store.delivery_attempted(delivery.id, delivered=False, status="no-association", error="refused",
                                    next_attempt_at=None, now=12.0) == DeliveryState.DEAD
    assert store.due_deliveries(1e12) == []
    (dead,) = store.deliveries(state=DeliveryState.DEAD)
    assert dead.attempts == 2 and dead.last_error == "refused"
    assert store.retry_delivery(dead.id, now=20.0) and not store.retry_delivery(dead.id, now=20.0)
    assert store.delivery_attempted(dead.id, delivered=True, status="0x0000", error=None, next_attempt_at=None,
                                    now=21.0) == DeliveryState.DELIVERED
    assert store.deliveries(STUDY)[0].delivered_at == 21.0


def test_a_batch_waits_for_its_mates_but_a_lone_study_does_not(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    store.record_instance(record("1.1", study="1.1"), "PACS", None, quiet_seconds=1, now=100.0)
    store.record_instance(record("2.1", study="2.2"), "PACS", None, quiet_seconds=1, now=101.5)
    store.record_instance(record("3.1", study="3.3"), "PACS", None, quiet_seconds=1, now=110.0)
    first, second, late = (store.study(uid) for uid in ("1.1", "2.2", "3.3"))
    unfinished = store.unfinished_studies()
    assert batch_mates_pending(first, unfinished, window_s=3.0), "the second arrived 1.5 s later"
    assert not batch_mates_pending(first, [late], window_s=3.0), "10 s later is not the same batch"
    assert not batch_mates_pending(first, [first], window_s=3.0)
    assert batch_mates_pending(second, [first], window_s=0.0), "an earlier study not yet indexed counts too"
