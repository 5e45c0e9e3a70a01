"""A node started with no model bundle: a real ``medfinder serve`` on an empty data folder answers C-ECHO at
once, takes a lung study from dcmtk storescu and holds it, answers queries with a truthful "no model bundle
active yet" (REST 503 over real HTTP, a C-FIND failure status to dcmtk findscu); then ``medfinder bundle install
--activate`` in another process — and the node, polling the registry, loads the bundle, embeds the study it
holds and sends its SR to a dcmtk storescp."""

from __future__ import annotations

import json
import re
import os
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
from node_helpers import (
    VENV_BIN,
    echoscu,
    free_port,
    nodelay_env,
    require_tools,
    start_node,
    stop_process,
    storescp,
    storescu,
    wait_for,
    write_node_config,
)

SERIES = "Lung_Dx-A0002_series2_B70f"  # 30 slices: the quickest lung study to embed
NO_BUNDLE = "no model bundle active yet"


def medfinder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "medfinder"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)


def token(data_dir: Path) -> str:
    result = medfinder("token", "create", "--name", "reader", "--scope", "read", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def state_of(data_dir: Path, study_uid: str) -> str | None:
    result = medfinder("studies", "--json", "--data-dir", str(data_dir))
    rows = {row["study_uid"]: row for row in json.loads(result.stdout or "[]")} if result.returncode == 0 else {}
    return rows.get(study_uid, {}).get("state")


def test_no_bundle_start_then_install_activates_and_embeds(tmp_path: Path, lung_ct_dir: Path,
                                                           tiny_bundle: Path) -> None:
    require_tools("findscu")
    data_dir = tmp_path / "node-data"
    reader = token(data_dir)
    files = sorted((lung_ct_dir / SERIES).glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with storescp(tmp_path / "pacs") as pacs_port:
        config = write_node_config(tmp_path / "node.yaml", data_dir, pacs_port)
        port, http_port = free_port(), free_port()
        log = tmp_path / "node.log"
        started = time.monotonic()
        node = start_node(config, port, log, "--http-port", str(http_port))  # returns once C-ECHO answers
        echo_s = time.monotonic() - started
        try:
            print(f"no-bundle node answered C-ECHO after {echo_s:.1f} s")
            base = f"http://127.0.0.1:{http_port}/api/v1"
            health = wait_for(lambda: _get(f"{base}/healthz"), 30, "the REST API")
            assert health.json() == {"status": "no_bundle", "bundle_id": None, "indexed": None}

            sent = storescu(port, files)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            wait_for(lambda: "event=studies_held count=1 reason='no active bundle yet'" in
                     log.read_text(errors="replace"), 30, "the node to say it holds the study")
            assert state_of(data_dir, study_uid) == "receiving", "held, not dispatched"

            headers = {"Authorization": f"Bearer {reader}"}
            searched = httpx.post(f"{base}/search", json={"text": "nodule"}, headers=headers, timeout=30)
            assert searched.status_code == 503 and NO_BUNDLE in searched.json()["detail"], searched.text
            similar = httpx.get(f"{base}/studies/{study_uid}/similar", headers=headers, timeout=30)
            assert similar.status_code == 503 and NO_BUNDLE in similar.json()["detail"], similar.text
            found = subprocess.run(["findscu", "-d", "-S", "-aet", "FINDSCU", "-aec", "MEDFINDER_SIM",
                                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                                    "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60,
                                   env=nodelay_env(), check=False)
            answer = found.stdout + found.stderr
            assert re.search(r"Status\s*: 0xc001", answer, re.IGNORECASE), answer  # failure, the message as Error Comment
            assert NO_BUNDLE in answer, answer

            installed = medfinder("bundle", "install", str(tiny_bundle), "--activate", "--data-dir", str(data_dir))
            assert installed.returncode == 0, installed.stderr
            wait_for(lambda: state_of(data_dir, study_uid) == "reported", 180,
                     f"the held study indexed and reported\n{log.read_text(errors='replace')[-3000:]}", interval=0.5)
            wait_for(lambda: list((tmp_path / "pacs").glob("SR*")), 60, "the SR at the PACS")
            health = httpx.get(f"{base}/healthz", timeout=30).json()
            assert health["status"] == "ok" and health["indexed"] == 1 and health["bundle_id"]
            assert echoscu(port)
        finally:
            stop_process(node)
    text = log.read_text(errors="replace")
    assert "event=bundle_activated" in text and "event=studies_released" in text


def _get(url: str) -> httpx.Response | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response if response.status_code == 200 else None
