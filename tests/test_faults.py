"""Faults, each against a real ``medfinder serve`` (tiny bundle, a dcmtk storescp as the PACS), on 127.0.0.1:

* Redis restarted while a study is queued: the lost task (no persistence) is re-sent by the node's redispatch
  timer, a study sent after the restart goes through; both indexed once, one SR each.
* The Celery worker SIGKILLed mid-task (parent and pool child, as when its machine dies): a new worker gets the
  task again (the node's redispatch; Redis would only hand back the unacked message after its visibility
  timeout) and the study is indexed once, one SR.
* The spool on a small tmpfs below ``node.min_free_disk_mb``: C-STORE answers 0xA700 and quarantines nothing;
  once space returns the re-sent objects are stored; nothing lost.
* PACS down: deliveries retried, then dead; ``medfinder deliveries retry`` (the CLI, on the node's data folder)
  with the PACS up delivers the SR and its PDF once.

After each: every received instance recorded, the study indexed exactly once (version 1, one outcome file, one
index point),
one SR and one PDF delivered per study.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import (
    REPO,
    VENV_BIN,
    free_port,
    port_open,
    require_tools,
    start_node,
    stop_process,
    storescp,
    storescu,
    wait_for,
    write_node_config,
)
from test_node_e2e import received_pdfs, received_srs

from benchmarks.receive_throughput import generate_series
from model_export.registry import install_bundle

pytestmark = pytest.mark.slow

SLICES = 24  # above selection.min_slices (20)
SIZE = 128  # small slices: the faults are the point, not the volume


@pytest.fixture
def node_data_dir(tmp_path: Path, tiny_bundle: Path) -> Path:
    """A fresh data folder with the tiny bundle installed and active."""
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    return data_dir


def make_study(folder: Path, patient_id: str | None, slices: int = SLICES, size: int = SIZE
               ) -> tuple[str, list[Path]]:
    """A synthetic CT study of its own (generate_series makes new UIDs per call but always the same patient, so
    the PatientID is rewritten unless ``patient_id`` is None); returns (StudyInstanceUID, files)."""
    generate_series(folder, slices, size)
    files = sorted(folder.glob("*.dcm"))
    if patient_id is None:
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files
    study_uid = ""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient_id, f"FAULT^{patient_id}"
        ds.save_as(path, enforce_file_format=True)
        study_uid = str(ds.StudyInstanceUID)
    return study_uid, files


def rows(state_db: Path, sql: str, *params: object) -> list[tuple]:
    with sqlite3.connect(state_db) as db:
        return db.execute(sql, params).fetchall()


def study_state(state_db: Path, study_uid: str) -> str | None:
    found = rows(state_db, "SELECT state FROM studies WHERE study_uid = ?", study_uid)
    return found[0][0] if found else None


def log_text(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.is_file() else ""


def wait_reported(state_db: Path, pacs_dir: Path, study_uids: list[str], logs: list[Path], timeout: float) -> None:
    """Until every study is reported and its SR and PDF have reached the PACS."""
    def done() -> bool:
        srs = {str(sr.StudyInstanceUID) for sr in received_srs(pacs_dir)}
        pdfs = {str(pdf.StudyInstanceUID) for pdf in received_pdfs(pacs_dir)}
        return all(study_state(state_db, uid) == "reported" and uid in srs and uid in pdfs for uid in study_uids)
    wait_for(done, timeout, "SRs and PDFs of every study\n" + "\n".join(log_text(p) for p in logs), interval=0.5)


def check_exactly_once(data_dir: Path, pacs_dir: Path, studies: dict[str, int]) -> None:
    """Every instance recorded, each study indexed once (version 1, one outcome), one SR and one PDF each."""
    state_db = data_dir / "state.sqlite3"
    time.sleep(1.0)  # a duplicate report would be queued by now
    for study_uid, n_instances in studies.items():
        assert rows(state_db, "SELECT COUNT(*) FROM instances WHERE study_uid = ?", study_uid)[0][0] == n_instances
        assert rows(state_db, "SELECT version, state FROM studies WHERE study_uid = ?", study_uid) == [
            (1, "reported")], "indexed exactly once"
        outcomes = sorted(p.name for p in (data_dir / "outcomes" / study_uid).glob("v*.json")
                          if not p.name.endswith(".report.json"))
        assert outcomes == ["v1.json"]
        assert rows(state_db, "SELECT state, COUNT(*) FROM deliveries WHERE study_uid = ? GROUP BY state",
                    study_uid) == [("delivered", 2)], "one SR and one PDF, delivered"
    srs = [str(sr.StudyInstanceUID) for sr in received_srs(pacs_dir)]
    pdfs = [str(pdf.StudyInstanceUID) for pdf in received_pdfs(pacs_dir)]
    assert sorted(srs) == sorted(studies) and sorted(pdfs) == sorted(studies), "no duplicate SR or PDF"


def index_points(config: Path, data_dir: Path) -> int:
    """Points in the node's edge index (one per indexed study and bundle), read once the node has stopped."""
    import json

    from config import load_settings
    from workers.index import open_index

    index = open_index(load_settings(config), data_dir / "index")
    try:
        collection = json.loads((data_dir / "index" / "medfinder" / "collection.json").read_text())
        index.ensure_collection(collection["bundle_id"], collection["dim"])
        return index.count()
    finally:
        index.close()


# --- distributed mode: Redis and the Celery worker --------------------------------------------------------


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    """redis-server on a fixed port (a restart must come back where the node and worker look), no persistence:
    a restart loses what was queued, the worst case."""
    require_tools("redis-server")
    with open(workdir / f"redis-{port}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                    "--appendonly", "no", "--dir", str(workdir)], stdout=log,
                                   stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(port), 20, "redis-server")
    return process


def start_worker(config: Path, log_path: Path) -> subprocess.Popen:
    """A Celery worker (prefork, one child) in a session of its own, so that killing its group kills the child
    that runs the task too (tests/node_helpers.celery_worker cannot: it kills the parent only)."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([str(VENV_BIN / "celery"), "-A", "workers", "worker", "-Q", "gpu", "--concurrency",
                                    "1", "--pool", "prefork", "--loglevel", "INFO", "--without-gossip",
                                    "--without-mingle", "--without-heartbeat"], cwd=REPO,
                                   env={**os.environ, "MEDFINDER_CONFIG": str(config), "HF_HUB_OFFLINE": "1"},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: log_path.read_text(errors="replace").count(" ready.") > 0 or process.poll() is not None, 60,
             "the Celery worker")
    assert process.poll() is None, log_text(log_path)
    return process


def queued_messages(port: int) -> int:
    """Messages waiting in Redis on the GPU queue (kombu keeps one list per priority step, all named gpu...)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return sum(int(client.llen(key)) for key in client.keys("gpu*") if client.type(key) == b"list")
    finally:
        client.close()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process's whole session (the worker and its pool child)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextlib.contextmanager
def distributed_node(tmp_path: Path, data_dir: Path, pacs_port: int, redis_port: int) -> Iterator[tuple[Path, int]]:
    """Config and a running node in distributed mode, re-dispatching a task whose outcome is 8 s overdue."""
    config = write_node_config(tmp_path / "node.yaml", data_dir, pacs_port, workers={
        "mode": "distributed", "broker_url": f"redis://127.0.0.1:{redis_port}/0", "redispatch_after_s": 8.0})
    port = free_port()
    node = start_node(config, port, tmp_path / "node.log")
    try:
        yield config, port
    finally:
        stop_process(node)


def test_redis_restart_mid_run(tmp_path: Path, node_data_dir: Path) -> None:
    pacs_dir, logs = tmp_path / "pacs", [tmp_path / "node.log", tmp_path / "worker.log"]
    uid_a, files_a = make_study(tmp_path / "a", "FAULTA")
    uid_b, files_b = make_study(tmp_path / "b", "FAULTB")
    redis_port = free_port()
    redis = start_redis(redis_port, tmp_path)
    worker = None
    try:
        with storescp(pacs_dir) as pacs_port, \
                distributed_node(tmp_path, node_data_dir, pacs_port, redis_port) as (config, port):
            # No worker yet: study A's task waits in Redis, and the restart loses it.
            assert storescu(port, files_a).returncode == 0
            wait_for(lambda: queued_messages(redis_port) == 1, 30, "study A's task in Redis\n" + log_text(logs[0]))
            stop_process(redis, signal.SIGKILL)
            restarted = time.monotonic()
            redis = start_redis(redis_port, tmp_path)
            worker = start_worker(config, logs[1])
            assert storescu(port, files_b).returncode == 0
            wait_reported(node_data_dir / "state.sqlite3", pacs_dir, [uid_a, uid_b], logs, 90)
            print(f"\nredis restart: both studies reported {time.monotonic() - restarted:.1f} s after the restart")
            check_exactly_once(node_data_dir, pacs_dir, {uid_a: len(files_a), uid_b: len(files_b)})
    finally:
        if worker is not None:
            stop_process(worker, timeout=30)
        stop_process(redis)
    assert index_points(tmp_path / "node.yaml", node_data_dir) == 2
    node_log = logs[0].read_text(errors="replace")
    assert f"event=redispatch study_uid={uid_a}" in node_log, "A was re-sent after the restart"
    assert f"event=redispatch study_uid={uid_b}" not in node_log


def test_worker_sigkilled_mid_task(tmp_path: Path, node_data_dir: Path) -> None:
    pacs_dir, logs = tmp_path / "pacs", [tmp_path / "node.log", tmp_path / "worker.log"]
    uid, files = make_study(tmp_path / "a", None, slices=300, size=512)  # big enough to be caught mid-task
    redis_port = free_port()
    redis = start_redis(redis_port, tmp_path)
    worker = None
    try:
        with storescp(pacs_dir) as pacs_port, \
                distributed_node(tmp_path, node_data_dir, pacs_port, redis_port) as (config, port):
            worker = start_worker(config, logs[1])
            assert storescu(port, files).returncode == 0
            wait_for(lambda: "embed_study" in log_text(logs[1]) and "received" in log_text(logs[1]), 30,
                     "the worker to take the task\n" + log_text(logs[1]), interval=0.02)
            kill_group(worker)
            killed = time.monotonic()
            outcome = node_data_dir / "outcomes" / uid / "v1.json"
            assert not outcome.exists(), "the task finished before the kill: make the study larger"
            worker = start_worker(config, logs[1])
            wait_reported(node_data_dir / "state.sqlite3", pacs_dir, [uid], logs, 90)
            print(f"\nworker SIGKILL: study reported {time.monotonic() - killed:.1f} s after the kill")
            check_exactly_once(node_data_dir, pacs_dir, {uid: len(files)})
    finally:
        if worker is not None:
            stop_process(worker, timeout=30)
        stop_process(redis)
    assert index_points(tmp_path / "node.yaml", node_data_dir) == 1


# --- the spool's file system full -------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def c_store_all(port: int, files: list[Path]) -> dict[Path, int]:
    """One association, one C-STORE per file; the status of each (pynetdicom, to see every status)."""
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDFINDER")
    assert assoc.is_established
    statuses = {}
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            statuses[path] = int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()
    return statuses


def test_spool_disk_full_refuses_then_recovers(tmp_path: Path, node_data_dir: Path) -> None:
    """The spool (what the node's free-space check watches, and where the received bytes go) is a 16 MB tmpfs;
    the rest of the data folder (the 88 MB bundle) stays on disk. Watermark 8 MB; a filler leaves room for about
    half the study above it."""
    pacs_dir, log = tmp_path / "pacs", tmp_path / "node.log"
    uid, files = make_study(tmp_path / "a", "FAULTD")
    per_file = files[0].stat().st_size
    with tmpfs(node_data_dir / "spool", 16) as spool, storescp(pacs_dir) as pacs_port:
        config = write_node_config(tmp_path / "node.yaml", node_data_dir, pacs_port,
                                   node={"min_free_disk_mb": 8, "quiet_seconds": 5})
        filler = spool / "filler.bin"
        free = os.statvfs(spool).f_bavail * os.statvfs(spool).f_frsize
        filler.write_bytes(b"\0" * int(free - 8 * 2**20 - per_file * (len(files) // 2)))
        port = free_port()
        node = start_node(config, port, log)
        try:
            statuses = c_store_all(port, files)
            refused = [path for path, status in statuses.items() if status == 0xA700]
            stored = [path for path, status in statuses.items() if status == 0x0000]
            print(f"\nspool full: {len(stored)} stored, {len(refused)} answered 0xA700 of {len(files)}")
            assert len(stored) + len(refused) == len(files), statuses
            assert stored and refused, statuses
            assert not any((node_data_dir / "quarantine").rglob("*.dcm")), "nothing quarantined for 0xA700"
            filler.unlink()
            again = c_store_all(port, refused)
            assert set(again.values()) == {0x0000}, again
            wait_reported(node_data_dir / "state.sqlite3", pacs_dir, [uid], [log], 60)
            check_exactly_once(node_data_dir, pacs_dir, {uid: len(files)})
        finally:
            stop_process(node)
        assert len(list((spool / uid).glob("*/*.dcm"))) == len(files), "every instance in the spool"
    assert index_points(config, node_data_dir) == 1


# --- the PACS down ----------------------------------------------------------------------------------------


def test_pacs_down_dead_letter_then_cli_retry(tmp_path: Path, node_data_dir: Path) -> None:
    pacs_dir, log = tmp_path / "pacs", tmp_path / "node.log"
    state_db = node_data_dir / "state.sqlite3"
    uid, files = make_study(tmp_path / "a", "FAULTP")
    pacs_port = free_port()  # nothing listens there yet
    config = write_node_config(tmp_path / "node.yaml", node_data_dir, pacs_port,
                               node={"delivery_attempts": 3, "delivery_backoff_s": 0.2, "delivery_timeout_s": 5})
    port = free_port()
    node = start_node(config, port, log)
    try:
        assert storescu(port, files).returncode == 0
        wait_for(lambda: rows(state_db, "SELECT state, attempts FROM deliveries") == [("dead", 3), ("dead", 3)], 60,
                 "both deliveries dead after 3 attempts\n" + log_text(log), interval=0.3)
        with storescp(pacs_dir, port=pacs_port):
            result = subprocess.run([str(VENV_BIN / "medfinder"), "deliveries", "retry", "--config", str(config),
                                     "--data-dir", str(node_data_dir)], check=False, cwd=REPO, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "retrying 2 dead deliveries" in result.stdout, result.stdout
            wait_reported(state_db, pacs_dir, [uid], [log], 30)
            print(f"\npacs down: {result.stdout.strip()}; delivered after the CLI retry")
            check_exactly_once(node_data_dir, pacs_dir, {uid: len(files)})
    finally:
        stop_process(node)
    assert index_points(config, node_data_dir) == 1
