"""The node end to end with real peers: dcmtk storescu sends the two lung-pet-ct-dx studies to a running
``medfinder serve``; a dcmtk storescp (the PACS) receives one Comprehensive 3D SR per study naming the other
study, and its Encapsulated PDF companion in the same study; every SR and PDF passes dciodvfy. Once in embedded mode, once in distributed mode (real redis-server, real Celery
worker process). Then: SIGKILL half-way through a study loses nothing and duplicates nothing.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import pydicom
import pydicom.errors
import pytest

from model_export.registry import install_bundle
from node_helpers import (
    celery_worker,
    dciodvfy,
    free_port,
    redis_server,
    start_node,
    stop_process,
    storescp,
    storescu,
    wait_for,
    write_node_config,
)
from sr_helpers import pdf_text, squash

SIMILAR_CASE_CODE_MEANING = "Similar case"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


@pytest.fixture
def node_data_dir(tmp_path: Path, tiny_bundle: Path) -> Path:
    """A fresh data folder with the tiny bundle installed and active."""
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    return data_dir


def lung_studies(lung_ct_dir: Path) -> dict[str, list[Path]]:
    """StudyInstanceUID -> the series folders of that study."""
    studies: dict[str, list[Path]] = {}
    for folder in sorted(lung_ct_dir.glob("Lung_Dx-*")):
        first = next(iter(sorted(folder.glob("*.dcm"))))
        study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
        studies.setdefault(study_uid, []).append(folder)
    return studies


def received_srs(pacs_dir: Path, prefix: str = "SR", sop_class: str = COMPREHENSIVE_3D_SR) -> list[pydicom.Dataset]:
    """The SRs storescp has finished writing (it names them SR3.<SOPInstanceUID>; a file mid-write is skipped:
    one written to within the last half second, or one that does not parse)."""
    srs = []
    for path in sorted(pacs_dir.glob(f"{prefix}*")):
        try:
            if time.time() - path.stat().st_mtime < 0.5:  # storescp may still be writing it
                continue
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            continue
        if ds.SOPClassUID == sop_class:
            srs.append(ds)
    return srs


def received_pdfs(pacs_dir: Path) -> list[pydicom.Dataset]:
    """The PDF companions storescp has finished writing (named PDF.<SOPInstanceUID>)."""
    return received_srs(pacs_dir, "PDF", ENCAPSULATED_PDF)


def referenced_study_uids(sr: pydicom.Dataset) -> set[str]:
    """Every UIDREF value in the SR content tree (the matched studies)."""
    found: set[str] = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "UIDREF":
                found.add(str(item.UID))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


def node_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-4000:] for p in tmp_path.glob("node*.log"))


def check_two_study_round_trip(tmp_path: Path, lung_ct_dir: Path, config: Path, pacs_dir: Path, *flags: str) -> None:
    studies = lung_studies(lung_ct_dir)
    assert len(studies) == 2
    port = free_port()
    node = start_node(config, port, tmp_path / "node.log", "--ae-title", "MEDFINDER",
                      "--allow-ae", "STORESCU@127.0.0.1", *flags)
    try:
        for folders in studies.values():
            result = storescu(port, folders)
            assert result.returncode == 0, result.stdout + result.stderr
        srs = wait_for(lambda: len(received_srs(pacs_dir)) >= 2 and received_srs(pacs_dir), 180,
                       f"two SRs at the PACS\n{node_log(tmp_path)}", interval=0.5)
        pdfs = wait_for(lambda: len(received_pdfs(pacs_dir)) >= 2 and received_pdfs(pacs_dir), 60,
                        f"two PDF companions at the PACS\n{node_log(tmp_path)}", interval=0.5)
    finally:
        stop_process(node)
    assert len(srs) == 2, "exactly one SR per study"
    assert len(pdfs) == 2 and {str(pdf.StudyInstanceUID) for pdf in pdfs} == set(studies), "one PDF per study"
    for pdf in pdfs:
        (other,) = set(studies) - {str(pdf.StudyInstanceUID)}
        document = bytes(pdf.EncapsulatedDocument)[:pdf.EncapsulatedDocumentLength]
        assert squash(other) in pdf_text(document), "the PDF names the other study"
    by_study = {str(sr.StudyInstanceUID): sr for sr in srs}
    assert set(by_study) == set(studies)
    for study_uid, sr in by_study.items():
        (other,) = set(studies) - {study_uid}
        assert other in referenced_study_uids(sr), f"the SR of {study_uid} does not name {other}"
        assert sr.Modality == "SR"
    for path in sorted([*pacs_dir.glob("SR*"), *pacs_dir.glob("PDF*")]):
        assert dciodvfy(path)[0] == [], path


def test_embedded_mode_round_trip(tmp_path: Path, lung_ct_dir: Path, node_data_dir: Path) -> None:
    pacs_dir = tmp_path / "pacs"
    with storescp(pacs_dir) as pacs_port:
        # The administrator's flags, on top of a config file that names neither the data folder nor the PACS.
        config = write_node_config(tmp_path / "node.yaml", tmp_path / "not-this-folder", None)
        check_two_study_round_trip(tmp_path, lung_ct_dir, config, pacs_dir, "--data-dir", str(node_data_dir),
                                   "--destination", f"PACS@127.0.0.1:{pacs_port}", "--quiet-seconds", "1.5")
    assert not (tmp_path / "not-this-folder").exists()


def test_distributed_mode_round_trip(tmp_path: Path, lung_ct_dir: Path, node_data_dir: Path) -> None:
    pacs_dir = tmp_path / "pacs"
    with storescp(pacs_dir) as pacs_port, redis_server(tmp_path) as broker_url:
        config = write_node_config(tmp_path / "node.yaml", node_data_dir, pacs_port,
                                   workers={"mode": "distributed", "broker_url": broker_url})
        with celery_worker(config, tmp_path / "worker.log"):
            check_two_study_round_trip(tmp_path, lung_ct_dir, config, pacs_dir)
        worker_log = (tmp_path / "worker.log").read_text(errors="replace")
        assert worker_log.count("event=embed_done") == 2, worker_log[-3000:]


def instances_recorded(state_db: Path) -> int:
    if not state_db.is_file():
        return 0
    with sqlite3.connect(state_db) as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def test_sigkill_half_way_loses_nothing(tmp_path: Path, lung_ct_dir: Path, node_data_dir: Path) -> None:
    """Kill -9 after half a series arrived, restart, send the rest: indexed once, one SR (and its PDF) delivered."""
    files = sorted((lung_ct_dir / "Lung_Dx-A0002_series2_B70f").glob("*.dcm"))
    half = len(files) // 2
    pacs_dir = tmp_path / "pacs"
    state_db = node_data_dir / "state.sqlite3"
    with storescp(pacs_dir) as pacs_port:
        # The quiet timer outlasts the restart, so the study cannot fire half-received.
        config = write_node_config(tmp_path / "node.yaml", node_data_dir, pacs_port, node={"quiet_seconds": 12})
        port = free_port()
        node = start_node(config, port, tmp_path / "node.log")
        try:
            assert storescu(port, files[:half]).returncode == 0
            wait_for(lambda: instances_recorded(state_db) == half, 30, "the first half to be recorded")
        finally:
            stop_process(node, signal.SIGKILL)
        node = start_node(config, port, tmp_path / "node.log")
        try:
            assert storescu(port, files[half:]).returncode == 0
            wait_for(lambda: received_srs(pacs_dir) and received_pdfs(pacs_dir), 120,
                     f"the SR and its PDF\n{node_log(tmp_path)}", interval=0.5)
            wait_for(lambda: _study_rows(state_db)[0]["state"] == "reported", 30, "the study to be reported")
        finally:
            stop_process(node)
    assert instances_recorded(state_db) == len(files)
    (study,) = _study_rows(state_db)
    assert study["version"] == 1, "indexed exactly once"
    outcomes = sorted(p.name for p in (node_data_dir / "outcomes" / study["study_uid"]).glob("v*.json")
                      if not p.name.endswith(".report.json"))
    assert outcomes == ["v1.json"]
    assert json.loads((node_data_dir / "outcomes" / study["study_uid"] / "v1.json").read_text())["payload"][
        "n_slices"] == len(files)
    assert len(received_srs(pacs_dir)) == 1 and len(received_pdfs(pacs_dir)) == 1, "one SR and one PDF delivered"
    with sqlite3.connect(state_db) as db:
        assert db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall() == [("delivered", 2)]


def _study_rows(state_db: Path) -> list[dict]:
    with sqlite3.connect(state_db) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM studies")]
