"""``GET /metrics`` on a real node (``medfinder serve --http-port``, a tiny bundle, dcmtk storescu and storescp, a
pynetdicom SCU for a refused object, an open association and a C-FIND): the scraped values follow what happens.

Checked after one study arrives (and is embedded, indexed, reported and delivered) and one object is refused:
instances by outcome and status, studies by state, queue depth, points per collection, embed outcomes and stage
histograms, deliveries by state, open associations, free disk, query latency and failures by interface and kind
(REST, C-FIND), and that no UID or patient attribute appears in the output. Then ``api.metrics: token`` (401
without a token, 403 without the read scope, 200 with it) and ``off`` (404) on nodes without a bundle.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from node_helpers import VENV_BIN, free_port, start_node, stop_process, storescp, storescu, wait_for, write_node_config
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind

from model_export.registry import install_bundle

SERIES = "Lung_Dx-A0002_series2_B70f"  # 30 slices, 16 MB: the smallest series that qualifies

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def create_token(data_dir: Path, name: str, scope: str) -> str:
    """A token from the real ``medfinder token create`` (the last line it prints)."""
    result = subprocess.run([str(VENV_BIN / "medfinder"), "token", "create", "--name", name, "--scope", scope,
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet, as Prometheus' ``or vector(0)``)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass(frozen=True)
class Served:
    url: str  # http://127.0.0.1:PORT
    dicom_port: int
    data_dir: Path
    log: Path
    reader: str
    bundle_id: str

    def scrape(self, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{self.url}/metrics", headers=headers, timeout=30)

    def samples(self) -> Samples:
        response = self.scrape()
        assert response.status_code == 200, response.text
        return parse(response.text)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Served]:
    work = tmp_path_factory.mktemp("metrics")
    data_dir = work / "node-data"
    bundle_id = install_bundle(tiny_bundle, data_dir, activate=True).name
    reader = create_token(data_dir, "prometheus", "read")
    with storescp(work / "pacs") as pacs_port:
        config = write_node_config(work / "node.yaml", data_dir, pacs_port)
        dicom_port, http_port = free_port(), free_port()
        log = work / "node.log"
        node = start_node(config, dicom_port, log, "--http-port", str(http_port))
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_for(lambda: _answers(f"{url}/api/v1/healthz"), 30, "the REST API")
            yield Served(url, dicom_port, data_dir, log, reader, bundle_id)
        finally:
            stop_process(node)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_metrics_follow_a_study_and_a_refused_object(served: Served, lung_ct_dir: Path) -> None:
    files = sorted((lung_ct_dir / SERIES).glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    response = served.scrape()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    before = parse(response.text)
    assert value(before, "medfinder_index_points", collection=_active_collection(before),
                 bundle_id=served.bundle_id, role="active") == 0

    # A refused object (no Study Instance UID), a C-FIND and the gauge of open associations, on one association.
    broken = pydicom.dcmread(files[0])
    broken.SOPInstanceUID = generate_uid()
    del broken.StudyInstanceUID
    ae = AE(ae_title="METRICSCU")
    ae.add_requested_context(CTImageStorage, [broken.file_meta.TransferSyntaxUID])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", served.dicom_port, ae_title="MEDFINDER")
    assert assoc.is_established
    try:
        refused = int(assoc.send_c_store(broken).Status)
        identifier = pydicom.Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""
        find_statuses = [int(status.Status) for status, _ in
                         assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind) if status]
        during = served.samples()
    finally:
        assoc.release()
    assert refused not in (0x0000, 0xB000, 0xB007, 0xB006), f"0x{refused:04X}"
    assert find_statuses[-1] == 0x0000
    assert value(during, "medfinder_dicom_associations", role="scp") >= 1

    result = storescu(served.dicom_port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    after = wait_for(lambda: _settled(served), 90, f"the study reported and delivered\n"
                     f"{served.log.read_text(errors='replace')[-3000:]}", interval=0.3)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("medfinder_dicom_instances_total", outcome="stored", status="0x0000") == len(files)
    assert delta("medfinder_dicom_instances_total", outcome="refused", status=f"0x{refused:04X}") == 1
    assert value(after, "medfinder_studies", state="reported") == 1
    assert value(after, "medfinder_studies", state="receiving") == 0
    assert value(after, "medfinder_studies", state="queued") == 0
    assert value(after, "medfinder_queue_depth") == 0
    assert value(after, "medfinder_index_points", collection=_active_collection(after), bundle_id=served.bundle_id,
                 role="active") == 1
    assert delta("medfinder_embed_outcomes_total", status="embedded") == 1
    assert delta("medfinder_embed_seconds_count", stage="total") == 1
    assert 0 < delta("medfinder_embed_seconds_sum", stage="total") < 120
    assert delta("medfinder_embed_seconds_count", stage="embed") == 1
    assert value(after, "medfinder_deliveries", state="delivered") == 2  # the SR and its PDF companion
    assert value(after, "medfinder_deliveries", state="dead") == value(after, "medfinder_deliveries",
                                                                        state="pending") == 0
    assert delta("medfinder_query_seconds_count", interface="cfind", kind="studies") == 1
    assert 0 < value(after, "medfinder_data_dir_free_bytes") <= value(after, "medfinder_data_dir_size_bytes")
    wait_for(lambda: value(served.samples(), "medfinder_dicom_associations", role="scp") == 0, 10,
             "the associations closed")

    # REST queries: latency of one answered, a failure for one refused (no token).
    similar = f"{served.url}/api/v1/studies/{study_uid}/similar"
    assert httpx.get(similar, headers={"Authorization": f"Bearer {served.reader}"}, timeout=60).status_code == 200
    assert httpx.get(similar, timeout=30).status_code == 401
    text = served.scrape().text
    last = parse(text)
    assert value(last, "medfinder_query_seconds_count", interface="rest", kind="similar") == 1
    assert 0 < value(last, "medfinder_query_seconds_sum", interface="rest", kind="similar") < 60
    assert value(last, "medfinder_query_failures_total", interface="rest", kind="similar") == 1
    assert value(last, "process_resident_memory_bytes") > 0
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    for secret in (study_uid, str(header.SeriesInstanceUID), str(header.PatientID), str(header.PatientName)):
        assert secret not in text  # counts, states and sizes only


def _settled(served: Served) -> Samples | None:
    samples = served.samples()
    done = (value(samples, "medfinder_studies", state="reported") == 1
            and value(samples, "medfinder_deliveries", state="delivered") >= 1
            and value(samples, "medfinder_deliveries", state="pending") == 0)
    return samples if done else None


def _active_collection(samples: Samples) -> str:
    """The active collection's name as the node labels it (the catalog names it after the bundle)."""
    names = [dict(labels)["collection"] for name, labels in samples
             if name == "medfinder_index_points" and dict(labels).get("role") == "active"]
    assert len(names) == 1, names
    return names[0]


def test_metrics_token_and_off(tmp_path: Path) -> None:
    """``api.metrics: token`` wants a read token; ``off`` has no route. Nodes without a bundle (quick to start)."""
    data_dir = tmp_path / "token-node"
    reader = create_token(data_dir, "prometheus", "read")
    reporter = create_token(data_dir, "ris", "report")
    for mode in ("token", "off"):
        config = write_node_config(tmp_path / f"{mode}.yaml", data_dir, None, api={"metrics": mode})
        http_port = free_port()
        node = start_node(config, free_port(), tmp_path / f"{mode}.log", "--http-port", str(http_port))
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_for(lambda url=url: _answers(f"{url}/api/v1/healthz"), 30, "the REST API")
            if mode == "off":
                assert httpx.get(f"{url}/metrics", timeout=30).status_code == 404
                continue
            assert httpx.get(f"{url}/metrics", timeout=30).status_code == 401
            assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {reporter}"},
                             timeout=30).status_code == 403
            response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {reader}"}, timeout=30)
            assert response.status_code == 200
            samples = parse(response.text)
            assert value(samples, "medfinder_studies", state="receiving") == 0
            assert not [name for name, _ in samples if name == "medfinder_index_points"]  # no bundle: no collection
        finally:
            stop_process(node)
