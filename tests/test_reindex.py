"""Model upgrade without downtime, over real processes: a running ``medfinder serve`` (tiny bundle A, REST on
127.0.0.1) answers one REST text query every 100 ms throughout, while ``medfinder reindex --bundle B`` (a second
tiny bundle: the tiny preset trained again with another seed) re-embeds the indexed study and a new study
arrives from dcmtk storescu. Zero failed queries; afterwards the answers carry B's id, both collections hold both
studies, ``medfinder reindex rollback`` brings A back, and the job table shows it all.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from node_helpers import VENV_BIN, free_port, start_node, stop_process, storescp, storescu, wait_for, write_node_config

from model_export.registry import install_bundle
from workers.index import point_id_for
from workers.index.catalog import EdgeCatalog

FIRST = "Lung_Dx-A0002_series2_B70f"  # 30 slices
SECOND = "Lung_Dx-A0001_series2_5mm"


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny bundle (different weights: another seed), so its vectors and id differ from tiny_bundle's."""
    from config import load_settings
    from medfinder.cli import main
    from trainer.engine.loop import train

    work = tmp_path_factory.mktemp("second-train")
    settings = load_settings("tiny", overrides={"paths": {"work_dir": str(work)},
                                                "train": {"progress": False, "seed": 7}})
    train(settings, work / "run")
    out = work / "bundle-b"
    assert main(["export", "--checkpoint", str(work / "run" / "best.pt"), "--out", str(out)]) == 0
    return out


def medfinder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "medfinder"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)


def study_uid(series: Path) -> str:
    return str(pydicom.dcmread(next(iter(sorted(series.glob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)


class QueryLoop:
    """One REST text search every 100 ms on its own thread; every non-200 (or transport error) is a failure."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.sent = 0
        self.failures: list[str] = []
        self.bundles: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=30) as c:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = c.post("/search", json={"text": "nodule", "limit": 5})
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    else:
                        self.bundles.append(response.json()["bundle_id"])
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                self.sent += 1
                self._stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def __enter__(self) -> QueryLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def search_bundle(base: str, token: str) -> str:
    response = httpx.post(f"{base}/search", json={"text": "nodule"}, headers={"Authorization": f"Bearer {token}"},
                          timeout=30)
    assert response.status_code == 200, response.text
    return str(response.json()["bundle_id"])


def states(data_dir: Path) -> dict[str, str]:
    import json

    result = medfinder("studies", "--json", "--data-dir", str(data_dir))
    return {row["study_uid"]: row["state"] for row in json.loads(result.stdout)} if result.returncode == 0 else {}


@dataclass
class Served:
    data_dir: Path
    port: int
    base: str  # REST root
    reader: str  # a read token
    bundle_a: str  # active at start
    bundle_b: str  # installed, the reindex target
    process: subprocess.Popen


@pytest.fixture
def node(tmp_path: Path, tiny_bundle: Path, second_bundle: Path) -> Iterator[Served]:
    data_dir = tmp_path / "node-data"
    bundle_a = install_bundle(tiny_bundle, data_dir, activate=True).name
    bundle_b = install_bundle(second_bundle, data_dir).name
    assert bundle_a != bundle_b
    created = medfinder("token", "create", "--name", "reader", "--scope", "read", "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    with storescp(tmp_path / "pacs") as pacs_port:
        config = write_node_config(tmp_path / "node.yaml", data_dir, pacs_port)
        port, http_port = free_port(), free_port()
        process = start_node(config, port, tmp_path / "node.log", "--http-port", str(http_port))
        try:
            yield Served(data_dir, port, f"http://127.0.0.1:{http_port}/api/v1", created.stdout.splitlines()[-1],
                         bundle_a, bundle_b, process)
        finally:
            stop_process(process)


def test_reindex_switches_with_zero_failed_queries_and_rolls_back(tmp_path: Path, lung_ct_dir: Path,
                                                                   node: Served) -> None:
    data_dir, port, base, reader, bundle_a, bundle_b = (node.data_dir, node.port, node.base, node.reader,
                                                        node.bundle_a, node.bundle_b)
    log = tmp_path / "node.log"
    first, second = study_uid(lung_ct_dir / FIRST), study_uid(lung_ct_dir / SECOND)
    assert storescu(port, lung_ct_dir / FIRST).returncode == 0
    wait_for(lambda: states(data_dir).get(first) == "reported", 180,
             f"the first study reported\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
    assert search_bundle(base, reader) == bundle_a

    with QueryLoop(base, reader) as loop:
        time.sleep(0.5)
        reindex = subprocess.Popen([str(VENV_BIN / "medfinder"), "reindex", "--bundle", bundle_b[:12],
                                    "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        sent = storescu(port, lung_ct_dir / SECOND)  # a new study arrives while the reindex runs
        assert sent.returncode == 0, sent.stdout + sent.stderr
        output, _ = reindex.communicate(timeout=300)
        assert reindex.returncode == 0, output + log.read_text(errors="replace")[-3000:]
        wait_for(lambda: states(data_dir).get(second) == "reported", 180,
                 f"the new study reported\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
        wait_for(lambda: loop.bundles and loop.bundles[-1] == bundle_b, 10, "a query answered by bundle B")
        rollback = medfinder("reindex", "rollback", "--data-dir", str(data_dir))
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        wait_for(lambda: loop.bundles[-1] == bundle_a, 10, "a query answered by bundle A again")
        time.sleep(0.5)
    print(f"{loop.sent} queries during reindex + rollback, {len(loop.failures)} failed")
    assert loop.sent >= 20 and loop.failures == [], loop.failures[:5]
    seen = [bundle for i, bundle in enumerate(loop.bundles) if i == 0 or loop.bundles[i - 1] != bundle]
    assert seen == [bundle_a, bundle_b, bundle_a], "A, then B after the switch, then A after the rollback"
    assert "done" in output and f"job 1: reindex to {bundle_b[:12]}" in output
    assert search_bundle(base, reader) == bundle_a

    status = medfinder("reindex", "status", "--data-dir", str(data_dir))
    assert status.returncode == 0
    assert f"serving: bundle {bundle_a}" in status.stdout and f"previous (rollback): bundle {bundle_b}" in status.stdout
    assert "job 2: rollback" in status.stdout and "job 1: reindex" in status.stdout
    text = log.read_text(errors="replace")
    assert text.count("event=bundle_switched") == 2


def test_both_collections_hold_both_studies_after_the_node_stops(tmp_path: Path, lung_ct_dir: Path,
                                                                 node: Served) -> None:
    """The same flow without the query loop, checked from disk once the node (the shards' owner) has stopped."""
    data_dir, port, bundle_a, bundle_b = node.data_dir, node.port, node.bundle_a, node.bundle_b
    log = tmp_path / "node.log"
    first, second = study_uid(lung_ct_dir / FIRST), study_uid(lung_ct_dir / SECOND)
    assert storescu(port, lung_ct_dir / FIRST).returncode == 0
    wait_for(lambda: states(data_dir).get(first) == "reported", 180, "the first study reported", interval=0.5)
    reindex = subprocess.Popen([str(VENV_BIN / "medfinder"), "reindex", "--bundle", bundle_b, "--data-dir",
                                str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert storescu(port, lung_ct_dir / SECOND).returncode == 0
    output, _ = reindex.communicate(timeout=300)
    assert reindex.returncode == 0, output
    wait_for(lambda: states(data_dir).get(second) == "reported", 180,
             f"the new study reported\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
    # Give the previous collection (a follower now) its copy of the new study, then stop the node.
    wait_for(lambda: "event=bundle_switched" in log.read_text(errors="replace"), 30, "the switch")
    time.sleep(3)
    stop_process(node.process)
    catalog = EdgeCatalog(data_dir / "index", _index_settings())
    pointer = catalog.read_pointer()
    assert pointer is not None and pointer.active.bundle_id == bundle_b and pointer.previous is not None
    assert pointer.previous.bundle_id == bundle_a
    for ref in (pointer.active, pointer.previous):
        index = catalog.open(ref.name)
        dim = 0
        try:
            from model_export.bundle_manifest import read_manifest
            from model_export.registry import find_bundle

            dim = read_manifest(find_bundle(data_dir, ref.bundle_id)).embedding_dim
            index.ensure_collection(ref.bundle_id, dim)
            for uid in (first, second):
                point = index.get(point_id_for(uid, ref.bundle_id))
                assert point is not None, f"{uid} missing from {ref.name}"
                assert point.payload["bundle_id"] == ref.bundle_id
        finally:
            index.close()
    from model_export.registry import active_bundle_id

    assert active_bundle_id(data_dir) == bundle_b, "the registry follows the switch (a restart serves B)"


def _index_settings():  # noqa: ANN202 - IndexSettings
    from config.settings import IndexSettings

    return IndexSettings()

