"""The node's pipeline in-process (embedded mode, real SCP, real dcmtk peers): what happens to a study that
cannot be embedded, to an instance that arrives after its study was reported, and to an SR nobody takes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_helpers import echoscu, free_port, storescp, storescu, wait_for

from config import Settings, load_settings
from dicom_node.node import Node
from dicom_node.store.state import DeliveryState, StudyState
from model_export.registry import install_bundle

SHORT_SERIES = "Lung_Dx-A0002_series2_B70f"  # 30 slices


def node_settings(data_dir: Path, pacs_port: int, **node: object) -> Settings:
    return load_settings(None, overrides={
        "paths": {"data_dir": str(data_dir)},
        "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 1.0, "poll_interval_s": 0.05,
                 "delivery_backoff_s": 0.2, "delivery_attempts": 2,
                 "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}], **node},
        "selection": {"min_slices": 20},
        "workers": {"onnx_threads": 1},
    })


@pytest.fixture
def data_dir(tmp_path: Path, tiny_bundle: Path) -> Path:
    folder = tmp_path / "node-data"
    install_bundle(tiny_bundle, folder, activate=True)
    return folder


def study_state(node: Node) -> StudyState | None:
    studies = node.store.studies()
    return studies[0].state if studies else None


def test_a_short_series_is_stored_not_embedded_with_the_reason(tmp_path: Path, lung_ct_dir: Path,
                                                              data_dir: Path) -> None:
    files = sorted((lung_ct_dir / SHORT_SERIES).glob("*.dcm"))[:12]
    with storescp(tmp_path / "pacs") as pacs_port:
        node = Node(node_settings(data_dir, pacs_port))
        node.start()
        try:
            assert storescu(node.scp.port, files).returncode == 0
            wait_for(lambda: study_state(node) == StudyState.NOT_EMBEDDED, 60, "the study to be judged")
            assert echoscu(node.scp.port), "the node keeps serving"
            (study,) = node.store.studies()
        finally:
            node.stop()
    assert "only 12 slice(s), need at least 20" in (study.reason or "")
    assert len(list((data_dir / "spool" / study.study_uid).glob("*/*.dcm"))) == 12, "stored all the same"
    assert not list((tmp_path / "pacs").glob("SR*")), "no SR for a study that was not embedded"
    listing = subprocess.run([str(Path(sys.executable).parent / "medfinder"), "studies", "--data-dir", str(data_dir)],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "not_embedded" in listing.stdout and "only 12 slice(s)" in listing.stdout


def test_a_late_instance_makes_a_new_result_version(tmp_path: Path, lung_ct_dir: Path, data_dir: Path) -> None:
    files = sorted((lung_ct_dir / SHORT_SERIES).glob("*.dcm"))
    pacs = tmp_path / "pacs"
    with storescp(pacs) as pacs_port:
        node = Node(node_settings(data_dir, pacs_port))
        node.start()
        try:
            assert storescu(node.scp.port, files[:-1]).returncode == 0
            wait_for(lambda: len(list(pacs.glob("SR*"))) == 1, 60, "the first SR")
            assert storescu(node.scp.port, files[:-1]).returncode == 0  # a re-send: no new work
            time.sleep(2.0)
            assert node.store.studies()[0].version == 1
            assert storescu(node.scp.port, files[-1:]).returncode == 0  # a new instance: a new version
            wait_for(lambda: len(list(pacs.glob("SR*"))) == 2, 60, "the second SR")
            (study,) = node.store.studies()
            deliveries = node.store.deliveries(study.study_uid)
        finally:
            node.stop()
    assert study.version == 2 and study.state == StudyState.REPORTED
    assert [d.version for d in deliveries] == [1, 1, 2, 2], "per version: the SR, then its PDF companion"
    assert len({d.sop_uid for d in deliveries}) == 4, "each result version has its own SR and PDF instance"


def test_an_unreachable_destination_ends_dead_and_an_operator_retries_it(tmp_path: Path, lung_ct_dir: Path,
                                                                         data_dir: Path) -> None:
    files = sorted((lung_ct_dir / SHORT_SERIES).glob("*.dcm"))
    closed_port = free_port()  # nothing listens here
    node = Node(node_settings(data_dir, closed_port))
    node.start()
    try:
        assert storescu(node.scp.port, files).returncode == 0
        wait_for(lambda: node.store.deliveries(state=DeliveryState.DEAD), 60, "the delivery to go dead")
    finally:
        node.stop()
    medfinder = str(Path(sys.executable).parent / "medfinder")
    listing = subprocess.run([medfinder, "deliveries", "--data-dir", str(data_dir), "--state", "dead"],
                             capture_output=True, text=True, timeout=60)
    assert "dead" in listing.stdout and f"127.0.0.1:{closed_port}" in listing.stdout
    retry = subprocess.run([medfinder, "deliveries", "retry", "--data-dir", str(data_dir)],
                           capture_output=True, text=True, timeout=60)
    assert retry.returncode == 0 and "retrying 2" in retry.stdout, "the SR and its PDF companion"
    # The PACS comes up on that port; the restarted node delivers the retried SR.
    pacs = tmp_path / "pacs"
    with storescp(pacs, port=closed_port):
        node = Node(node_settings(data_dir, closed_port))
        node.start()
        try:
            wait_for(lambda: len(node.store.deliveries(state=DeliveryState.DELIVERED)) == 2, 60,
                     "the retried deliveries")
        finally:
            node.stop()
    assert len(list(pacs.glob("SR*"))) == 1 and len(list(pacs.glob("PDF*"))) == 1
