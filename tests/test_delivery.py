"""SR delivery by C-STORE to real peers: dcmtk's storescp as the PACS, and a pynetdicom SCP for statuses.

Every listener binds 127.0.0.1 on a free port picked at run time and is stopped in a ``finally``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from node_helpers import dataset_bytes, free_port, storescp
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage
from sr_helpers import write_sr

from config import load_settings
from dicom_node.deliver.delivery import DeliveryWorker, backoff_delay, send_file
from dicom_node.store.state import DeliveryState, StateStore


@contextmanager
def status_scp(port: int, status: int, syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
               allowed_callers: list[str] | None = None) -> Iterator[list]:
    """A pynetdicom SCP on 127.0.0.1:``port`` answering every C-STORE with ``status``; yields what it got."""
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return status

    ae = AE(ae_title="STATUSSCP")
    ae.add_supported_context(Comprehensive3DSRStorage, list(syntaxes))
    ae.require_calling_aet = allowed_callers or []
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield received
    finally:
        server.shutdown()


def _settings(tmp_path: Path, attempts: int = 3, backoff_s: float = 0.05):
    return load_settings(None, environ={}, overrides={
        "paths": {"data_dir": str(tmp_path / "data")},
        "node": {"ae_title": "MEDFINDER", "delivery_attempts": attempts, "delivery_backoff_s": backoff_s,
                 "delivery_timeout_s": 5.0, "poll_interval_s": 0.05},
    })


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    path, _ = write_sr(tmp_path / "results")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    handle = StateStore(tmp_path / "state.sqlite3")
    try:
        yield handle
    finally:
        handle.close()


def _queue(store: StateStore, path: Path, port: int, ae_title: str = "PACS", now: float | None = None) -> int:
    sr = pydicom.dcmread(path, stop_before_pixels=True)
    store.add_delivery(sr.StudyInstanceUID, 1, sr.SOPInstanceUID, path, f"{ae_title}@127.0.0.1:{port}", ae_title,
                       "127.0.0.1", port, now=now)
    return store.deliveries()[-1].id


def test_sr_delivered_to_dcmtk_storescp_arrives_unchanged(sr_file: Path, tmp_path: Path) -> None:
    port, inbox = free_port(), tmp_path / "pacs"
    with storescp(inbox, port=port):
        result = send_file(sr_file, "MEDFINDER", "PACS", "127.0.0.1", port, timeout_s=10)

    assert (result.delivered, result.status, result.error) == (True, "0x0000", None)
    (received,) = [p for p in inbox.iterdir() if p.is_file()]
    assert dataset_bytes(received) == dataset_bytes(sr_file)  # byte for byte, as stored by us
    assert pydicom.dcmread(received) == pydicom.dcmread(sr_file)


def test_warning_status_counts_as_delivered(sr_file: Path) -> None:
    port = free_port()
    with status_scp(port, 0xB000) as received:
        result = send_file(sr_file, "MEDFINDER", "STATUSSCP", "127.0.0.1", port, timeout_s=10)

    assert (result.delivered, result.status) == (True, "0xB000")
    assert [ds.SOPInstanceUID for ds in received] == [pydicom.dcmread(sr_file).SOPInstanceUID]


def test_failure_status_is_not_delivered(sr_file: Path) -> None:
    port = free_port()
    with status_scp(port, 0xA700):
        result = send_file(sr_file, "MEDFINDER", "STATUSSCP", "127.0.0.1", port, timeout_s=10)

    assert (result.delivered, result.status) == (False, "0xA700")
    assert "0xA700" in (result.error or "")


def test_rejected_association_is_reported(sr_file: Path) -> None:
    port = free_port()
    with status_scp(port, 0x0000, allowed_callers=["SOMEONE"]) as received:
        result = send_file(sr_file, "MEDFINDER", "STATUSSCP", "127.0.0.1", port, timeout_s=10)

    assert (result.delivered, result.status) == (False, "no-association")
    assert "rejected" in (result.error or "") and received == []


def test_implicit_only_peer_gets_the_sr_re_encoded(sr_file: Path) -> None:
    port = free_port()
    with status_scp(port, 0x0000, syntaxes=(ImplicitVRLittleEndian,)) as received:
        result = send_file(sr_file, "MEDFINDER", "STATUSSCP", "127.0.0.1", port, timeout_s=10)

    assert result.delivered
    assert received[0].ContentSequence == pydicom.dcmread(sr_file).ContentSequence


def test_unreachable_destination_backs_off_then_dies_and_an_operator_retry_delivers(
        sr_file: Path, store: StateStore, tmp_path: Path) -> None:
    settings = _settings(tmp_path, attempts=3, backoff_s=0.05)
    worker, port, t0 = DeliveryWorker(settings, store), free_port(), 1_000_000.0
    delivery_id = _queue(store, sr_file, port, now=t0)

    assert worker.run_once(now=t0) == 1
    (row,) = store.deliveries()
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.PENDING, 1, "no-association")
    assert row.next_attempt_at == pytest.approx(t0 + 0.05)
    assert worker.run_once(now=t0 + 0.04) == 0  # not due yet: the backoff is honoured

    assert worker.run_once(now=t0 + 0.05) == 1
    assert store.deliveries()[0].next_attempt_at == pytest.approx(t0 + 0.05 + 0.10)  # doubled
    assert worker.run_once(now=t0 + 0.15) == 1
    (dead,) = store.deliveries(state=DeliveryState.DEAD)
    assert (dead.id, dead.attempts) == (delivery_id, 3)
    assert "127.0.0.1" in (dead.last_error or "")
    assert worker.run_once(now=t0 + 1e6) == 0  # dead deliveries are never retried by themselves

    inbox = tmp_path / "pacs"
    with storescp(inbox, port=port):
        assert store.retry_delivery(delivery_id)
        assert worker.run_once() == 1
    (done,) = store.deliveries()
    assert (done.state, done.last_status) == (DeliveryState.DELIVERED, "0x0000")
    (received,) = [p for p in inbox.iterdir() if p.is_file()]
    assert dataset_bytes(received) == dataset_bytes(sr_file)


def test_missing_result_file_is_dead_at_once(store: StateStore, tmp_path: Path) -> None:
    path, _ = write_sr(tmp_path / "results")
    _queue(store, path, free_port())
    path.unlink()

    assert DeliveryWorker(_settings(tmp_path), store).run_once() == 1
    (row,) = store.deliveries()
    assert (row.state, row.last_status) == (DeliveryState.DEAD, "bad-file")
    assert "missing" in (row.last_error or "")


def test_run_forever_delivers_and_stops(sr_file: Path, store: StateStore, tmp_path: Path) -> None:
    port, stop = free_port(), threading.Event()
    worker = DeliveryWorker(_settings(tmp_path), store)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    with storescp(tmp_path / "pacs", port=port):
        _queue(store, sr_file, port)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while store.deliveries()[0].state is not DeliveryState.DELIVERED and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(timeout=10)
    assert not thread.is_alive()
    assert store.deliveries()[0].state is DeliveryState.DELIVERED


def test_backoff_doubles() -> None:
    assert [backoff_delay(2.0, n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
