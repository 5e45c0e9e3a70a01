"""The REST API over real HTTP: ``medfinder serve --http-port`` in its own process (uvicorn on 127.0.0.1) with the two
lung-pet-ct-dx studies sent by dcmtk storescu and indexed, tokens made by the real ``medfinder token`` command.

Checked: listing, similar-by-study (JSON and DICOM JSON), text search, a report PUT that becomes searchable, the
auth cases (401/403), 404 and 422 for bad input (never a 5xx), token revocation taking effect on the running node,
the audit trail (and the searched text never in the node's log), and the REST round trip p50 (printed, not
asserted). Plus the token store, the audit log's concurrent appends and the serve flags, without a node.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from node_helpers import VENV_BIN, free_port, start_node, stop_process, storescu, wait_for, write_node_config

from dicom_node.api.audit import AuditEntry, AuditLog
from dicom_node.api.tokens import Scope, TokenStore, digest
from model_export.registry import install_bundle

A0001_SERIES = "Lung_Dx-A0001_series2_5mm"
A0002_SERIES = "Lung_Dx-A0002_series2_B70f"
DONE_STATES = {"indexed", "reported"}
MEDFINDER = str(VENV_BIN / "medfinder")


def token_command(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MEDFINDER, "token", *args, "--data-dir", str(data_dir)], capture_output=True, text=True,
                          check=False, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def create_token(data_dir: Path, name: str, *scopes: str) -> str:
    """A token from the real command: the last line of its standard output."""
    scope_args = [arg for scope in scopes for arg in ("--scope", scope)]
    result = token_command(data_dir, "create", "--name", name, *scope_args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def study_uid_of(series_dir: Path) -> str:
    return str(pydicom.dcmread(next(iter(sorted(series_dir.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)


@dataclass(frozen=True)
class ServedNode:
    base: str  # http://127.0.0.1:PORT/api/v1
    data_dir: Path
    log: Path
    a0001: str  # StudyInstanceUIDs
    a0002: str
    reader: str  # tokens
    reporter: str
    admin: str
    bundle_id: str

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.base, headers=headers, timeout=120)

    def audit_lines(self) -> list[dict]:
        path = self.data_dir / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def _all_indexed(base: str, token: str, uids: set[str]) -> bool:
    """Every study of ``uids`` indexed and reported."""
    response = httpx.get(f"{base}/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    states = {s["study_instance_uid"]: s["state"] for s in response.json()["studies"]}
    # "reported" is final here (no destination: the SR is written, nothing queued); waiting for it keeps the
    # state from changing between two requests of one test
    return set(states) >= uids and all(states[u] == "reported" for u in uids)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, lung_ct_dir: Path) -> Iterator[ServedNode]:
    work = tmp_path_factory.mktemp("api")
    data_dir = work / "node-data"
    bundle_id = install_bundle(tiny_bundle, data_dir, activate=True).name  # <registry>/<bundle_id>
    reader = create_token(data_dir, "reader", "read")  # before the node starts; the others while it runs
    config = write_node_config(work / "node.yaml", data_dir, None)
    dicom_port, http_port = free_port(), free_port()
    log = work / "node.log"
    node = start_node(config, dicom_port, log, "--http-port", str(http_port))
    try:
        base = f"http://127.0.0.1:{http_port}/api/v1"
        wait_for(lambda: _health(base), 30, "the REST API")
        reporter = create_token(data_dir, "ris", "report")
        admin = create_token(data_dir, "root", "admin")
        for series in (A0001_SERIES, A0002_SERIES):
            result = storescu(dicom_port, sorted((lung_ct_dir / series).glob("*.dcm")))
            assert result.returncode == 0, result.stdout + result.stderr
        uids = {study_uid_of(lung_ct_dir / A0001_SERIES), study_uid_of(lung_ct_dir / A0002_SERIES)}
        wait_for(lambda: _all_indexed(base, reader, uids), 240,
                 f"both studies indexed\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
        yield ServedNode(base=base, data_dir=data_dir, log=log, a0001=study_uid_of(lung_ct_dir / A0001_SERIES),
                         a0002=study_uid_of(lung_ct_dir / A0002_SERIES), reader=reader, reporter=reporter,
                         admin=admin, bundle_id=bundle_id)
    finally:
        stop_process(node)


def _health(base: str) -> dict | None:
    try:
        response = httpx.get(f"{base}/healthz", timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


# --- reading --------------------------------------------------------------------------------------------------


def test_healthz_is_open_and_counts_the_indexed_studies(served: ServedNode) -> None:
    with served.client() as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "bundle_id": served.bundle_id, "indexed": 2}


def test_docs_page_and_its_assets_are_served_by_the_node(served: ServedNode) -> None:
    """/docs must work on a network without internet: every asset it names comes from the node itself."""
    root = served.base.removesuffix("/api/v1")
    page = httpx.get(f"{root}/docs", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"} <= set(assets)
    assert all(asset.startswith("/") for asset in assets), f"an asset from elsewhere: {assets}"
    for asset in assets:
        fetched = httpx.get(f"{root}{asset}", timeout=30)
        assert fetched.status_code == 200 and len(fetched.content) > 100, asset
    assert "/api/v1/studies/{uid}/similar" in httpx.get(f"{root}/openapi.json", timeout=30).json()["paths"]


def test_studies_lists_both_with_state_and_attributes(served: ServedNode) -> None:
    with served.client(served.reader) as client:
        listing = client.get("/studies")
        one = client.get(f"/studies/{served.a0001}")
        unknown = client.get("/studies/1.2.3.4.5.6.7.8.9")
    assert listing.status_code == 200
    body = listing.json()
    assert body["total"] == 2
    by_uid = {s["study_instance_uid"]: s for s in body["studies"]}
    assert set(by_uid) == {served.a0001, served.a0002}
    for study in by_uid.values():
        assert study["state"] in DONE_STATES
        assert study["n_instances"] > 0 and study["version"] == 1
        assert study["modalities_in_study"] == ["CT"]
        assert study["study_date"] and len(study["study_date"]) == 8
        assert study["patient_name"] is None and study["patient_id"] is None, "identity off by policy"
    assert one.status_code == 200 and one.json() == by_uid[served.a0001]
    assert unknown.status_code == 404 and "1.2.3.4.5.6.7.8.9" in unknown.json()["detail"]


def test_similar_ranks_the_other_lung_study_first(served: ServedNode) -> None:
    with served.client(served.reader) as client:
        response = client.get(f"/studies/{served.a0001}/similar", params={"limit": 5})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["bundle_id"] == served.bundle_id
    assert body["query"]["study_uid"] == served.a0001
    first = body["results"][0]
    assert first["rank"] == 1 and first["study_instance_uid"] == served.a0002
    assert isinstance(first["score"], float) and -1.0 <= first["score"] <= 1.0
    assert first["modality"] == "CT"
    assert served.a0001 not in [r["study_instance_uid"] for r in body["results"]], "never the query study itself"


def test_similar_as_dicom_json(served: ServedNode) -> None:
    with served.client(served.reader) as client:
        plain = client.get(f"/studies/{served.a0001}/similar").json()
        response = client.get(f"/studies/{served.a0001}/similar", headers={"Accept": "application/dicom+json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    studies = response.json()
    assert isinstance(studies, list) and len(studies) == len(plain["results"])
    first = studies[0]
    assert first["0020000D"] == {"vr": "UI", "Value": [served.a0002]}
    for tag, vr in {"00080020": "DA", "00080050": "SH", "00081030": "LO", "00080061": "CS", "00180015": "CS"}.items():
        assert first[tag]["vr"] == vr, tag
    assert first["00080061"]["Value"] == ["CT"]
    assert first["00990010"] == {"vr": "LO", "Value": ["MEDFINDER"]}
    assert first["00991002"] == {"vr": "US", "Value": [1]}
    assert first["00991001"]["vr"] == "FD"
    assert first["00991001"]["Value"][0] == pytest.approx(plain["results"][0]["score"])
    # pydicom reads it back: the private block resolves by its creator.
    dataset = pydicom.Dataset.from_json(first)
    assert dataset.private_block(0x0099, "MEDFINDER")[0x02].value == 1


def test_text_search_returns_ranked_results(served: ServedNode) -> None:
    with served.client(served.reader) as client:
        response = client.post("/search", json={"text": "Spiculated mass in the right upper lobe.", "limit": 10})
        keyword = client.post("/search", json={"text": "atelectasis", "limit": 1, "filters": {"modality": "CT"}})
    assert response.status_code == 200
    results = response.json()["results"]
    assert {r["study_instance_uid"] for r in results} == {served.a0001, served.a0002}
    assert [r["rank"] for r in results] == [1, 2]
    assert results[0]["score"] >= results[1]["score"]
    assert keyword.status_code == 200 and len(keyword.json()["results"]) == 1
    assert "text" not in response.json()["query"], "the echoed query never repeats the text"


def test_a_report_put_over_rest_becomes_searchable(served: ServedNode) -> None:
    report = ("FINDINGS: Large cavitating mass in the left lower lobe with a thick irregular wall. Mediastinal "
              "lymphadenopathy. IMPRESSION: Cavitating left lower lobe mass, suspicious for squamous carcinoma.")
    with served.client(served.reporter) as reporter:
        put = reporter.put(f"/studies/{served.a0002}/report", content=report.encode(),
                           headers={"Content-Type": "text/plain; charset=utf-8"})
    assert put.status_code == 200, put.text
    assert put.json() == {"study_instance_uid": served.a0002, "characters": len(report), "source": "rest"}

    def found() -> dict | None:
        with served.client(served.reader) as client:
            results = client.post("/search", json={"text": report}).json()["results"]
        return next((r for r in results if r["study_instance_uid"] == served.a0002 and r["has_report"]), None)

    hit = wait_for(found, 30, "the report to be searchable")
    assert hit["rank"] == 1, "its report ranking lifts it to the top"


# --- refusals -------------------------------------------------------------------------------------------------


def test_auth_refusals(served: ServedNode) -> None:
    similar = f"/studies/{served.a0001}/similar"
    with served.client() as anonymous:
        missing = anonymous.get(similar)
        wrong = anonymous.get(similar, headers={"Authorization": "Bearer mfn_not-a-token"})
        basic = anonymous.get(similar, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
    with served.client(served.reader) as reader:
        cannot_write = reader.put(f"/studies/{served.a0001}/report", content=b"text",
                                  headers={"Content-Type": "text/plain"})
    with served.client(served.reporter) as reporter:
        cannot_read = reporter.get(similar)
    assert cannot_write.status_code == 403 and "report" in cannot_write.json()["detail"]
    assert 'error="insufficient_scope"' in cannot_write.headers["www-authenticate"]
    assert cannot_read.status_code == 403
    with served.client(served.admin) as admin:  # admin implies read
        assert admin.get(similar).status_code == 200


def test_unknown_study_is_404(served: ServedNode) -> None:
    with served.client(served.reader) as client:
        response = client.get("/studies/1.2.826.0.1.3680043.8.498.1/similar")
    assert response.status_code == 404
    assert "1.2.826.0.1.3680043.8.498.1" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path", "kwargs", "says"), [
    ("get", "similar", {"params": {"study_date_from": "2020"}}, "study_date_from"),
    ("get", "similar", {"params": {"study_date_from": "20201340"}}, "not a calendar date"),
    ("get", "similar", {"params": {"study_date_from": "20210101", "study_date_to": "20200101"}}, "is after"),
    ("get", "similar", {"params": {"limit": 0}}, "limit"),
    ("get", "similar", {"params": {"limit": 101}}, "less than or equal to 100"),
    ("get", "similar", {"params": {"offset": -1}}, "offset"),
    ("get", "similar", {"params": {"sex": "X"}}, "sex"),
    ("get", "similar", {"params": {"bodypart": "CHEST"}}, "bodypart"),
    ("get", "similar", {"params": {"min_score": "high"}}, "min_score"),
    ("get", "/studies/not-a-uid/similar", {}, "uid"),
    ("post", "/search", {"json": {"text": ""}}, "text"),
    ("post", "/search", {"json": {"text": "   \n"}}, "blank"),
    ("post", "/search", {"json": {}}, "text"),
    ("post", "/search", {"json": {"text": "nodule", "filters": {"modality": "CT", "colour": "red"}}}, "colour"),
    ("post", "/search", {"json": {"text": "nodule", "limit": 0}}, "limit"),
    ("post", "/search", {"content": b'{"text": "nodule",', "headers": {"Content-Type": "application/json"}},
     "JSON"),
    ("put", "/studies/1.2.3/report", {"content": b"  ", "headers": {"Content-Type": "text/plain"}}, "empty"),
    ("put", "/studies/1.2.3/report", {"content": b"\xff\xfe bad", "headers": {"Content-Type": "text/plain"}},
     "utf-8"),
])
def test_bad_input_is_422_saying_what_is_wrong(served: ServedNode, method: str, path: str, kwargs: dict,
                                               says: str) -> None:
    url = f"/studies/{served.a0001}/similar" if path == "similar" else path
    with served.client(served.admin) as client:
        response = getattr(client, method)(url, **kwargs)
    assert response.status_code == 422, response.text
    assert says in json.dumps(response.json()["detail"]), response.text


def test_report_must_be_text_plain(served: ServedNode) -> None:
    with served.client(served.reporter) as client:
        response = client.put(f"/studies/{served.a0001}/report", json={"text": "a report"})
    assert response.status_code == 415


# --- tokens and audit -----------------------------------------------------------------------------------------


def test_a_token_from_the_command_works_until_revoked(served: ServedNode) -> None:
    token = create_token(served.data_dir, "workstation-7", "read")
    listing = token_command(served.data_dir, "list")
    assert listing.returncode == 0 and "workstation-7" in listing.stdout and "read" in listing.stdout
    assert token not in listing.stdout and digest(token) not in listing.stdout
    stored = (served.data_dir / "secrets" / "tokens.json").read_text()
    assert token not in stored and digest(token) in stored
    with served.client(token) as client:
        assert client.get("/studies").status_code == 200
        revoked = token_command(served.data_dir, "revoke", "workstation-7")
        assert revoked.returncode == 0, revoked.stderr
        after = client.get("/studies")
    assert after.status_code == 401
    assert token_command(served.data_dir, "revoke", "workstation-7").returncode == 1, "already gone"


def test_queries_and_report_writes_are_audited_and_the_text_stays_out_of_the_log(served: ServedNode) -> None:
    secret_text = "Subsegmental atelectasis at the lingula, query audit marker QX-5521"
    report = "Audit marker report RX-8812: no acute findings."
    before = len(served.audit_lines())
    with served.client(served.reader) as reader:
        searched = reader.post("/search", json={"text": secret_text, "limit": 2, "filters": {"modality": "CT"}})
        similar = reader.get(f"/studies/{served.a0001}/similar", params={"limit": 3})
    with served.client(served.reporter) as reporter:
        put = reporter.put(f"/studies/{served.a0001}/report", content=report.encode(),
                           headers={"Content-Type": "text/plain"})
    assert searched.status_code == similar.status_code == put.status_code == 200
    lines = served.audit_lines()[before:]
    by_kind = {line["kind"]: line for line in lines}
    assert set(by_kind) >= {"search", "similar", "report"}
    for line in lines:
        assert set(line) == {"time", "token", "client", "kind", "parameters", "status", "results", "latency_ms"}
        assert line["client"] == "127.0.0.1" and line["status"] == 200 and line["latency_ms"] >= 0
    search = by_kind["search"]
    assert search["token"] == "reader"
    assert search["parameters"]["text"] == secret_text, "the privacy officer sees what was looked up"
    assert search["parameters"]["filters"] == {"modality": "CT"} and search["parameters"]["limit"] == 2
    assert search["results"] == [r["study_instance_uid"] for r in searched.json()["results"]]
    assert by_kind["similar"]["parameters"]["study_uid"] == served.a0001
    assert by_kind["similar"]["results"] == [r["study_instance_uid"] for r in similar.json()["results"]]
    written = by_kind["report"]
    assert written["token"] == "ris" and written["results"] == [served.a0001]
    assert written["parameters"]["characters"] == len(report) and report not in json.dumps(written)
    assert oct((served.data_dir / "audit" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    log = served.log.read_text(errors="replace")
    assert "event=http_ready" in log
    assert "QX-5521" not in log and "RX-8812" not in log, "query and report text never in the application log"


def test_rest_round_trip_p50(served: ServedNode, capsys: pytest.CaptureFixture[str]) -> None:
    """50 similar-study queries over one keep-alive connection; the p50 is printed, not asserted."""
    latencies = []
    with served.client(served.reader) as client:
        client.get(f"/studies/{served.a0001}/similar")  # warm
        for _ in range(50):
            started = time.perf_counter()
            response = client.get(f"/studies/{served.a0001}/similar", params={"limit": 10})
            latencies.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
    latencies.sort()
    with capsys.disabled():
        print(f"\nREST round trip, GET /studies/{{uid}}/similar, 2 studies indexed, n=50: "
              f"p50 {statistics.median(latencies):.1f} ms, p95 {latencies[int(0.95 * len(latencies)) - 1]:.1f} ms")


# --- without a node -------------------------------------------------------------------------------------------


def test_token_store_keeps_hashes_only_readable_by_the_owner(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "secrets" / "tokens.json")
    token = store.create("pacs-bridge", ["report", "read"])
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert token not in store.path.read_text()
    record = store.authenticate(token)
    assert record is not None and record.name == "pacs-bridge"
    assert record.allows(Scope.READ) and record.allows(Scope.REPORT) and not record.allows(Scope.ADMIN)
    assert store.authenticate(token + "x") is None
    admin = store.authenticate(store.create("boss", ["admin"]))
    assert admin is not None and all(admin.allows(scope) for scope in Scope)
    store.revoke("pacs-bridge")
    assert store.authenticate(token) is None


def test_audit_appends_whole_lines_from_many_threads(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl")

    def write(thread: int) -> None:
        for i in range(200):
            audit.append(AuditEntry(time="t", token=f"t{thread}", client=None, kind="search",
                                    parameters={"text": "x" * 3000, "i": i}, status=200, results=[], latency_ms=1.0))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    lines = audit.path.read_text().splitlines()
    assert len(lines) == 1600
    assert all(json.loads(line)["parameters"]["text"] == "x" * 3000 for line in lines)


def test_serve_refuses_a_rest_port_in_use(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    config = write_node_config(tmp_path / "node.yaml", data_dir, None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([MEDFINDER, "serve", "--config", str(config), "--port", str(free_port()),
                                 "--http-port", str(port)], capture_output=True, text=True, check=False,
                                timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"the REST API cannot listen on 127.0.0.1:{port}" in result.stderr


def test_serve_flags_set_the_api_settings() -> None:
    from dicom_node.cli import node_settings
    from medfinder.cli import build_parser

    parser = build_parser()
    off = node_settings(parser.parse_args(["serve", "--http-port", "0"]))
    assert off.api.http_port == 0
    on = node_settings(parser.parse_args(["serve", "--http-port", "18080", "--http-bind", "0.0.0.0"]))
    assert (on.api.http_port, on.api.http_bind) == (18080, "0.0.0.0")
