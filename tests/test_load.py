"""The node under load, with real peers: 8 dcmtk storescu processes at once, each sending its own 300-slice study
to ``medfinder serve`` (embedded mode, tiny bundle), must lose nothing, index every study once and deliver one
SR (and its PDF) per study to a dcmtk storescp, while still answering C-ECHO; and ``node.max_associations``
must turn the next association away with A-ASSOCIATE-RJ "local limit exceeded" until one is released.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from node_helpers import (
    echoscu,
    free_port,
    start_node,
    stop_process,
    storescp,
    storescu,
    wait_for,
    write_node_config,
)
from pynetdicom import AE, Association
from pynetdicom.sop_class import Verification
from test_node_e2e import received_pdfs, received_srs

from benchmarks.receive_throughput import generate_series
from model_export.registry import install_bundle

pytestmark = pytest.mark.slow

SENDERS = 8
SLICES = 300
# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): rejected-transient, DICOM UL service-provider (presentation related
# function), local-limit-exceeded: pynetdicom's acceptor sends exactly these when maximum_associations is reached.
RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED = 0x02, 0x03, 0x02


def series_for_sender(folder: Path, index: int) -> int:
    """One study for sender ``index``: generate_series makes a new StudyInstanceUID per call but always writes
    PatientID BENCH0001, so patch it in the header bytes (same length, before Pixel Data) to a per-sender ID;
    rewriting 300 files of 0.5 MB with pydicom would cost more than the whole receive."""
    total = generate_series(folder, SLICES)
    old, new = b"BENCH0001", f"BENCH{index + 1:04d}".encode()
    assert len(old) == len(new)
    if new == old:
        return total
    for path in sorted(folder.glob("*.dcm")):
        data = bytearray(path.read_bytes())
        at = data.find(old, 0, 4096)  # the header; Pixel Data (random values) comes after
        assert at > 0 and data.find(old, at + 1, 4096) == -1, path
        data[at:at + len(old)] = new
        path.write_bytes(bytes(data))
    return total


def state_rows(state_db: Path, sql: str) -> list[tuple]:
    if not state_db.is_file():
        return []
    with sqlite3.connect(state_db, timeout=10) as db:
        return db.execute(sql).fetchall()


def node_log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.is_file() else ""


def test_eight_concurrent_senders(tmp_path: Path, tiny_bundle: Path) -> None:
    """All 2400 instances recorded, 8 studies reported at version 1, one SR and one PDF each at the PACS."""
    sources = [tmp_path / f"sender{i}" for i in range(SENDERS)]
    total_bytes = sum(series_for_sender(folder, i) for i, folder in enumerate(sources))
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    state_db = data_dir / "state.sqlite3"
    pacs_dir = tmp_path / "pacs"
    log = tmp_path / "node.log"
    with storescp(pacs_dir) as pacs_port:
        config = write_node_config(tmp_path / "node.yaml", data_dir, pacs_port,
                                   node={"max_associations": SENDERS + 2, "min_free_disk_mb": 0})
        port = free_port()
        node = start_node(config, port, log)
        try:
            results: list[subprocess.CompletedProcess | None] = [None] * SENDERS
            ended: list[float] = [0.0] * SENDERS

            def send(i: int) -> None:
                results[i] = storescu(port, sources[i], calling_ae=f"LOAD{i}", timeout=240)
                ended[i] = time.perf_counter()

            threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(1.0)  # let every sender's association open before echoing
            echo_seconds: list[float] = []
            senders_active: list[int] = []  # senders still running when each C-ECHO was answered
            while any(thread.is_alive() for thread in threads) and len(echo_seconds) < 5:
                t0 = time.perf_counter()
                assert echoscu(port), f"C-ECHO not answered while senders were active\n{node_log_tail(log)}"
                echo_seconds.append(time.perf_counter() - t0)
                senders_active.append(sum(thread.is_alive() for thread in threads))
                time.sleep(0.5)
            for thread in threads:
                thread.join(timeout=300)
            received_at = max(ended)
            for i, result in enumerate(results):
                assert result is not None and result.returncode == 0, (i, result and result.stderr[-2000:])
            wait_for(lambda: len(received_srs(pacs_dir)) >= SENDERS and len(received_pdfs(pacs_dir)) >= SENDERS,
                     240, f"{SENDERS} SRs and PDFs at the PACS\n{node_log_tail(log)}", interval=0.5)
            last_sr = time.perf_counter()
            wait_for(lambda: state_rows(state_db, "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'")
                     == [(2 * SENDERS,)], 30, "every delivery recorded as delivered")
            time.sleep(2.0)  # a duplicate SR, were one on its way, would land now
        finally:
            stop_process(node)
    receive_s = received_at - started
    assert echo_seconds, "the senders finished before a C-ECHO could be tried"
    print(f"\nload: {SENDERS} storescu x {SLICES} slices 512x512 ({total_bytes / 1e6:.0f} MB) in {receive_s:.1f} s "
          f"= {total_bytes / 1e6 / receive_s:.0f} MB/s; first send -> last SR {last_sr - started:.1f} s; C-ECHO "
          f"during load: {len(echo_seconds)} answered, max {max(echo_seconds) * 1000:.0f} ms, "
          f"median {sorted(echo_seconds)[len(echo_seconds) // 2] * 1000:.0f} ms, senders still sending {senders_active}")
    assert senders_active[0] == SENDERS, "the first C-ECHO did not overlap all 8 senders"
    assert state_rows(state_db, "SELECT COUNT(*) FROM instances") == [(SENDERS * SLICES,)]
    studies = state_rows(state_db, "SELECT study_uid, state, version FROM studies")
    assert len(studies) == SENDERS
    assert {(state, version) for _uid, state, version in studies} == {("reported", 1)}, studies
    assert state_rows(state_db, "SELECT COUNT(DISTINCT point_id) FROM studies") == [(SENDERS,)], "one point each"
    assert state_rows(state_db, "SELECT COUNT(DISTINCT patient_id) FROM study_attributes") == [(SENDERS,)]
    srs, pdfs = received_srs(pacs_dir), received_pdfs(pacs_dir)
    study_uids = {uid for uid, _state, _version in studies}
    for uid in study_uids:
        outcomes = sorted(p.name for p in (data_dir / "outcomes" / uid).glob("v*.json")
                          if not p.name.endswith(".report.json"))
        assert outcomes == ["v1.json"], (uid, outcomes)
    assert sorted(str(sr.StudyInstanceUID) for sr in srs) == sorted(study_uids), "exactly one SR per study"
    assert sorted(str(pdf.StudyInstanceUID) for pdf in pdfs) == sorted(study_uids), "exactly one PDF per study"
    for folder in [*sources, data_dir / "spool"]:  # 2.5 GB; pytest keeps the last three runs' tmp_path
        shutil.rmtree(folder, ignore_errors=True)


def _associate(port: int, ae_title: str) -> Association:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="MEDFINDER")


def test_max_associations_rejects_then_recovers(tmp_path: Path, tiny_bundle: Path) -> None:
    """With node.max_associations = 2 and two held open, the third gets A-ASSOCIATE-RJ 2/3/2 (local limit
    exceeded); after one is released a new association is accepted."""
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    config = write_node_config(tmp_path / "node.yaml", data_dir, None, node={"max_associations": 2})
    port = free_port()
    log = tmp_path / "node.log"
    node = start_node(config, port, log)
    held: list[Association] = []
    try:
        # start_node's C-ECHO association may still be winding down on the node's side.
        held.append(wait_for(lambda: (a := _associate(port, "HOLD1")).is_established and a, 10, "association 1"))
        held.append(wait_for(lambda: (a := _associate(port, "HOLD2")).is_established and a, 10, "association 2"))
        third = _associate(port, "THIRD")
        assert third.is_rejected, f"a third association was not rejected\n{node_log_tail(log)}"
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (
            RJ_TRANSIENT, RJ_SOURCE_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED), rj
        assert rj.reason_str == "Local limit exceeded"
        assert held[0].send_c_echo().Status == 0x0000, "a held association stopped working"
        held.pop(0).release()
        # The node's acceptor thread leaves active_associations shortly after the release.
        fourth = wait_for(lambda: (a := _associate(port, "FOURTH")).is_established and a, 10,
                          "an association after one was released")
        assert fourth.send_c_echo().Status == 0x0000
        fourth.release()
    finally:
        for assoc in held:
            assoc.release()
        stop_process(node)
