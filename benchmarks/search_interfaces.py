"""The query interfaces at scale, on the index ``benchmarks.search`` built: rows for its table.

Each row runs the node's real code over the built index: the query engine (:class:`workers.search.QueryEngine`)
with a real model bundle's text encoder, the REST app (FastAPI + uvicorn on 127.0.0.1, real HTTP with a bearer
token) and the C-FIND SCP (the node's own AE with its ``EVT_C_FIND`` handler, queried by a pynetdicom SCU on
127.0.0.1 over one open association, TCP_NODELAY set on both sides).

The bundle must embed into the index's dimension. ``prepare_bundle`` makes one when none is given: the ``tiny``
preset trained for two epochs with ``model.embedding_dim`` set to the index's dimension, exported to ONNX. Its text
tower is the reference bundle's (all-MiniLM-L6-v2, frozen) with a trained head, so the text-encoding cost is the
one a served MiniLM bundle pays; only its rankings are meaningless (the index holds synthetic vectors).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Report-like texts of varied length (no PHI): what a radiologist types or pastes.
TEXTS = (
    "Consolidation in the right lower lobe with air bronchograms.",
    "Small left pleural effusion. No pneumothorax.",
    "Multiple pulmonary nodules, the largest 12 mm in the left upper lobe.",
    "Enlarged mediastinal lymph nodes, paratracheal and subcarinal.",
    "Centrilobular emphysema, upper lobe predominant. Plate-like atelectasis at both bases.",
    "EXAM: Chest CT with contrast. FINDINGS: Partial collapse of the right lower lobe with volume loss and "
    "elevation of the right hemidiaphragm. The heart is normal in size. No pericardial effusion. IMPRESSION: "
    "Right lower lobe collapse.",
    "atelectasis",
    "pleural effusion",
)


def prepare_bundle(dim: int, work: Path) -> Path:
    """A bundle folder embedding into ``dim`` dimensions (see the module docstring); takes about a minute."""
    run, out = work / "bundle-run", work / "bundle"
    common = [sys.executable, "-m", "medfinder"]
    subprocess.run([*common, "train", "--config", "tiny", "--set", f"model.embedding_dim={dim}",
                    "--set", f"paths.work_dir={work / 'runs'}", "--out", str(run)], check=True,
                   capture_output=True, timeout=1800)
    subprocess.run([*common, "export", "--checkpoint", str(run / "best.pt"), "--out", str(out), "--force"],
                   check=True, capture_output=True, timeout=1800)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values)
    return {"p50_ms": float(np.percentile(array, 50)), "p95_ms": float(np.percentile(array, 95))}


def _engine(index: Any, bundle_dir: Path, settings: Any) -> Any:
    from model_export.runtime import load_bundle
    from workers.search import QueryEngine

    bundle = load_bundle(bundle_dir, expected_dim=None, threads=None)
    return QueryEngine(settings, index, bundle, bundle.bundle_id, request_for=lambda _uid: None)


def text_rows(n: int, index: Any, bundle_dir: Path, settings: Any, repeats: int = 10) -> list[dict[str, Any]]:
    """Text query end to end: the engine's ``search_text`` (keyword detection, tokenise, encode, search)."""
    engine = _engine(index, bundle_dir, settings)
    for text in TEXTS:  # warm-up: ONNX session, first graph touches
        engine.search_text(text, limit=10)
    latencies = []
    for _ in range(repeats):
        for text in TEXTS:
            started = time.perf_counter()
            engine.search_text(text, limit=10)
            latencies.append((time.perf_counter() - started) * 1000)
    return [{"studies": n, "query": "text end to end", "search": "engine.search_text (MiniLM-L6 + head, encode + "
             "search)", **_percentiles(latencies), "queries": len(latencies)}]


def rest_rows(n: int, index: Any, bundle_dir: Path, settings: Any, study_uids: list[str],
              work: Path) -> list[dict[str, Any]]:
    """REST round trip: ``GET /api/v1/studies/{uid}/similar?limit=10`` over HTTP, one keep-alive client."""
    import httpx

    from dicom_node.api.app import create_app
    from dicom_node.api.audit import AuditLog
    from dicom_node.api.server import ApiServer
    from dicom_node.api.services import ApiServices
    from dicom_node.api.tokens import TokenStore
    from dicom_node.store.state import StateStore

    work.mkdir(parents=True, exist_ok=True)
    engine = _engine(index, bundle_dir, settings)
    tokens = TokenStore(work / "tokens.json")
    token = tokens.create("benchmark", ["read"])
    store = StateStore(work / "state.sqlite3")
    services = ApiServices(engine=engine, store=store, attach_report=lambda *_: None, tokens=tokens,
                           audit=AuditLog(work / "audit.jsonl"), settings=settings)
    server = ApiServer(create_app(services), "127.0.0.1", 0)
    server.start()
    latencies = []
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as client:
            for uid in study_uids[:10]:
                client.get(f"/api/v1/studies/{uid}/similar", params={"limit": 10}).raise_for_status()
            for uid in study_uids:
                started = time.perf_counter()
                client.get(f"/api/v1/studies/{uid}/similar", params={"limit": 10}).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
    finally:
        server.stop()
        store.close()
    return [{"studies": n, "query": "REST round trip", "search": "GET /studies/{uid}/similar, limit 10, audited",
             **_percentiles(latencies), "queries": len(latencies)}]


def cfind_rows(n: int, index: Any, bundle_dir: Path, settings: Any, study_uids: list[str],
               work: Path) -> list[dict[str, Any]]:
    """C-FIND round trip: MEDFINDER_SIM with a StudyInstanceUID, 10 pending responses, one open association."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from dicom_node.receive.scp import StorageSCP
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    node_settings = settings.model_copy(update={"node": settings.node.model_copy(update={
        "bind": "127.0.0.1", "port": 0, "allow": []})})
    layout = NodeLayout.create(work / "cfind-data")
    store = StateStore(layout.state_db)
    scp = StorageSCP(node_settings, layout, store)
    scp.query_engine = _engine(index, bundle_dir, node_settings)
    scp.start()
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = ae.associate("127.0.0.1", scp.port, ae_title=node_settings.query.similar_ae_title)
    association.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    try:
        if not association.is_established:
            raise RuntimeError("the C-FIND association was refused")
        for i, uid in enumerate(study_uids):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = uid
            identifier.StudyDescription = ""
            identifier.StudyDate = ""
            started = time.perf_counter()
            statuses = [status.Status for status, _ in association.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind)]
            if i >= 10:  # the first ten warm up
                latencies.append((time.perf_counter() - started) * 1000)
            if statuses[-1] != 0x0000 or len(statuses) != 11:
                raise RuntimeError(f"unexpected C-FIND statuses {[hex(s) for s in statuses]}")
    finally:
        association.release()
        scp.stop()
        store.close()
    return [{"studies": n, "query": "C-FIND round trip", "search": "MEDFINDER_SIM by StudyInstanceUID, 10 matches",
             **_percentiles(latencies), "queries": len(latencies)}]


def interface_rows(n: int, index: Any, bundle_dir: Path, settings: Any, study_uids: list[str]) -> list[dict[str, Any]]:
    """Every interface row for one size (the index must hold ``study_uids`` under the bundle's id)."""
    with tempfile.TemporaryDirectory(prefix="search-interfaces-") as tmp:
        work = Path(tmp)
        rows = text_rows(n, index, bundle_dir, settings)
        rows += rest_rows(n, index, bundle_dir, settings, study_uids, work / "rest")
        rows += cfind_rows(n, index, bundle_dir, settings, study_uids, work / "cfind")
    return rows
