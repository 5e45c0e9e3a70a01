"""``medfinder backfill`` with real peers: dcmtk ``dcmqrscp`` is the PACS (its config written here, the studies
indexed with ``dcmqridx``), the node is a running ``medfinder serve``, dcmtk ``storescp`` its SR destination;
Debian Orthanc is the REST source.

The PACS holds copies of the shared fixtures with study dates rewritten so that a date range selects exactly
what is wanted: lung A0001 on 20240102 and the GE head CT on 20240103 (inside 20240101-20240105), lung A0002 on
20231230 (outside), and a three-image MR study on 20240102 (inside, but not CT; dcmqrscp ignores
``ModalitiesInStudy``, so the backfill's series-level fallback must drop it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pydicom
import pytest
from node_helpers import (
    VENV_BIN,
    free_port,
    nodelay_env,
    port_open,
    require_tools,
    start_node,
    stop_process,
    storescp,
    wait_for,
    write_dcmqrscp_config,
    write_node_config,
)
from orthanc_helpers import orthanc_server
from pydicom.uid import generate_uid

from model_export.registry import install_bundle

REPO = Path(__file__).resolve().parent.parent
MEDFINDER = str(VENV_BIN / "medfinder")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SINCE, UNTIL = "20240101", "20240105"


@dataclass(frozen=True)
class Archive:
    """The PACS content: study UID per role, and the folder of each study's files."""

    a0001: str
    a0002: str
    head: str
    mr: str
    folders: dict[str, Path]
    counts: dict[str, int]


def _copy_with_date(files: list[Path], out: Path, study_date: str, new_uids: dict[str, str] | None = None,
                    modality: str | None = None) -> str:
    """Copies of ``files`` with StudyDate rewritten (and, for ``new_uids``, new study/series/SOP UIDs and a
    modality); returns the study UID."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = ""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyDate = study_date
        if new_uids is not None:
            ds.StudyInstanceUID = new_uids["study"]
            ds.SeriesInstanceUID = new_uids["series"]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if modality is not None:
            ds.Modality = modality
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        study_uid = str(ds.StudyInstanceUID)
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return study_uid


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, lung_ct_dir: Path, shared_data: Path) -> Archive:
    work = tmp_path_factory.mktemp("archive")
    head_files = sorted((shared_data / "ct" / "dcm_qa_ct-ge-head").glob("*.dcm"))
    folders = {"a0001": work / "a0001", "a0002": work / "a0002", "head": work / "head", "mr": work / "mr"}
    a0001 = _copy_with_date([p for s in ("Lung_Dx-A0001_series2_5mm", "Lung_Dx-A0001_series3_5mm")
                             for p in sorted((lung_ct_dir / s).glob("*.dcm"))], folders["a0001"], "20240102")
    a0002 = _copy_with_date([p for s in ("Lung_Dx-A0002_series2_B70f", "Lung_Dx-A0002_series3_B40f")
                             for p in sorted((lung_ct_dir / s).glob("*.dcm"))], folders["a0002"], "20231230")
    head = _copy_with_date(head_files, folders["head"], "20240103")
    mr = _copy_with_date(head_files[:3], folders["mr"], "20240102", {"study": generate_uid(), "series": generate_uid()},
                         modality="MR")
    counts = {role: len(list(folder.glob("*.dcm"))) for role, folder in folders.items()}
    return Archive(a0001, a0002, head, mr, folders, counts)



@contextlib.contextmanager
def dcmqrscp(work: Path, archive: Archive, node_port: int) -> Iterator[int]:
    """dcmtk dcmqrscp serving every archive study as AE PACS (read-only), with the node's AE title in its host
    table so that it can C-MOVE to it; yields its port."""
    require_tools("dcmqrscp", "dcmqridx")
    storage = work / "PACS"
    storage.mkdir(parents=True)
    files = []
    for folder in archive.folders.values():
        for path in sorted(folder.glob("*.dcm")):
            target = storage / path.name
            os.link(path, target)
            files.append(str(target))
    subprocess.run(["dcmqridx", str(storage), *files], check=True, capture_output=True, timeout=120)
    port = free_port()
    config = write_dcmqrscp_config(work / "dcmqrscp.cfg", port, storage, {"node": ("MEDFINDER", node_port)},
                                   quota="(200, 1024mb)")
    with open(work / "dcmqrscp.log", "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(["dcmqrscp", "-v", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   env=nodelay_env())
    try:
        wait_for(lambda: process.poll() is not None or port_open(port), 20, "dcmqrscp")
        assert process.poll() is None, (work / "dcmqrscp.log").read_text(errors="replace")[-2000:]
        yield port
    finally:
        stop_process(process)


@dataclass
class NodeUnderTest:
    config: Path
    data_dir: Path
    log: Path
    port: int
    pacs_dir: Path  # where the node's SR destination (storescp) writes


@contextlib.contextmanager
def running_node(work: Path, tiny_bundle: Path, **sections: dict) -> Iterator[NodeUnderTest]:
    """``medfinder serve`` (tiny bundle, SRs to a storescp) on a port the PACS knows before it starts."""
    data_dir = work / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    pacs_dir = work / "sr-destination"
    port = free_port()
    with storescp(pacs_dir) as destination_port:
        node_section = {"port": port, **sections.pop("node", {})}
        config = write_node_config(work / "node.yaml", data_dir, destination_port, node=node_section, **sections)
        log = work / "node.log"
        process = start_node(config, port, log)
        try:
            yield NodeUnderTest(config, data_dir, log, port, pacs_dir)
        finally:
            stop_process(process)


def backfill_command(node: NodeUnderTest, *args: str) -> list[str]:
    return [MEDFINDER, "backfill", "--config", str(node.config), *args]


def run_backfill(node: NodeUnderTest, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(backfill_command(node, *args), check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def node_studies(data_dir: Path) -> dict[str, dict]:
    db_path = data_dir / "state.sqlite3"
    if not db_path.is_file():
        return {}
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return {r["study_uid"]: dict(r) for r in db.execute("SELECT * FROM studies")}


def held(data_dir: Path, study_uid: str) -> int:
    return int(node_studies(data_dir).get(study_uid, {}).get("n_instances", 0))


def backfill_rows(data_dir: Path) -> dict[str, dict]:
    with sqlite3.connect(data_dir / "backfill.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return {r["study_uid"]: dict(r) for r in db.execute("SELECT * FROM studies")}


def settled(data_dir: Path, uids: set[str]) -> bool:
    studies = node_studies(data_dir)
    return all(studies.get(u, {}).get("state") in ("backfilled", "reported", "not_embedded", "failed") for u in uids)


def sr_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("SR*")) if folder.is_dir() else []


def test_backfill_move_killed_half_way_resumes_without_refetch(tmp_path: Path, archive: Archive,
                                                                tiny_bundle: Path) -> None:
    """C-MOVE of exactly the CT studies of the range; SIGKILL after the first study arrived; the re-run completes
    without asking again for it; no SR for backfilled studies; the head CT is stored but not embedded."""
    with running_node(tmp_path, tiny_bundle) as node, dcmqrscp(tmp_path / "pacs", archive, node.port) as qr_port:
        source = f"PACS@127.0.0.1:{qr_port}"
        dry = run_backfill(node, "--from", source, "--since", SINCE, "--until", UNTIL, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stderr.count("would fetch") == 2, dry.stderr
        assert archive.a0001 in dry.stderr and archive.head in dry.stderr and archive.mr not in dry.stderr

        # One study every 15 s: the kill lands after the first study arrived, before the second is asked for.
        with open(tmp_path / "backfill-1.log", "wb") as log:
            first = subprocess.Popen(backfill_command(node, "--from", source, "--since", SINCE, "--until", UNTIL,
                                                      "--rate", "4"), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_for(lambda: held(node.data_dir, archive.a0001) >= archive.counts["a0001"] or first.poll() is not None,
                     120, "the first study at the node")
            assert first.poll() is None, (tmp_path / "backfill-1.log").read_text()
            assert held(node.data_dir, archive.head) == 0, "the second study was not asked for yet"
        finally:
            stop_process(first, signal.SIGKILL)

        second = run_backfill(node, "--from", source, "--since", SINCE, "--until", UNTIL)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "1 asked for, 1 complete" in second.stdout, second.stdout
        wait_for(lambda: settled(node.data_dir, {archive.a0001, archive.head}), 120,
                 f"both studies processed\n{node.log.read_text(errors='replace')[-3000:]}", interval=0.5)

        third = run_backfill(node, "--from", source, "--since", SINCE, "--until", UNTIL)
        assert third.returncode == 0 and "0 asked for" in third.stdout, third.stdout + third.stderr
        status = run_backfill(node, "status")
        assert status.returncode == 0 and "2 complete" in status.stdout, status.stdout

    studies = node_studies(node.data_dir)
    assert set(studies) == {archive.a0001, archive.head}, "exactly the CT studies of the date range"
    assert studies[archive.a0001]["n_instances"] == archive.counts["a0001"]
    assert studies[archive.head]["n_instances"] == archive.counts["head"]
    node_log = node.log.read_text(errors="replace")
    assert "event=instance_duplicate" not in node_log, "a complete study was fetched again"
    rows = backfill_rows(node.data_dir)
    assert rows[archive.a0001]["attempts"] == 1 and rows[archive.head]["attempts"] == 1
    assert {rows[u]["state"] for u in (archive.a0001, archive.head)} == {"complete"}
    assert archive.a0002 not in rows and archive.mr not in rows
    assert studies[archive.a0001]["state"] == "backfilled", studies[archive.a0001]
    assert sr_files(node.pacs_dir) == [], "backfilled studies send no SR"
    with sqlite3.connect(node.data_dir / "state.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0
    # Domain routing (model_export.domain): the chest bundle does not embed the head CT and says why.
    head = studies[archive.head]
    assert head["state"] == "not_embedded", head
    assert "HEAD" in (head["reason"] or "") and "CHEST" in (head["reason"] or ""), head["reason"]


def test_backfill_get_with_report(tmp_path: Path, archive: Archive, tiny_bundle: Path) -> None:
    """C-GET (objects come to the backfill and are C-STOREd on to the node) with --report: the SR goes out."""
    with running_node(tmp_path, tiny_bundle) as node, dcmqrscp(tmp_path / "pacs", archive, node.port) as qr_port:
        result = run_backfill(node, "--from", f"PACS@127.0.0.1:{qr_port}", "--since", "20231230", "--until",
                              "20231230", "--method", "get", "--report")
        assert result.returncode == 0, result.stdout + result.stderr
        assert held(node.data_dir, archive.a0002) == archive.counts["a0002"]
        wait_for(lambda: sr_files(node.pacs_dir), 120,
                 f"the SR of the backfilled study\n{node.log.read_text(errors='replace')[-3000:]}", interval=0.5)
    assert node_studies(node.data_dir)[archive.a0002]["state"] == "reported"


def _orthanc_config(folder: Path, http_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"Name": "backfill-test", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "HttpPort": http_port, "DicomPort": free_port(),
              "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_backfill_from_orthanc_rest(tmp_path: Path, archive: Archive, tiny_bundle: Path) -> None:
    """--from-orthanc: /tools/find per day (CT only), each instance downloaded and C-STOREd to the node."""
    orthanc_port = free_port()
    with orthanc_server(_orthanc_config(tmp_path / "orthanc", orthanc_port), orthanc_port, tmp_path / "orthanc.log"):
        url = f"http://127.0.0.1:{orthanc_port}"
        for role in ("head", "mr"):
            for path in sorted(archive.folders[role].glob("*.dcm")):
                assert httpx.post(f"{url}/instances", content=path.read_bytes(), timeout=60).status_code == 200
        with running_node(tmp_path, tiny_bundle) as node:
            result = run_backfill(node, "--from-orthanc", url, "--since", SINCE, "--until", UNTIL)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "1 asked for, 1 complete" in result.stdout, result.stdout
            again = run_backfill(node, "--from-orthanc", url, "--since", SINCE, "--until", UNTIL)
            assert again.returncode == 0 and "0 asked for" in again.stdout, again.stdout + again.stderr
    studies = node_studies(node.data_dir)
    assert set(studies) == {archive.head}, "the CT study only"
    assert studies[archive.head]["n_instances"] == archive.counts["head"]
    with sqlite3.connect(node.data_dir / "state.sqlite3") as db:
        assert db.execute("SELECT source FROM reports_suppressed WHERE study_uid = ?",
                          (archive.head,)).fetchone() == ("backfill",)


def test_daily_window_and_pacer() -> None:
    """The window crosses midnight; the pacer says why it waits and spaces studies by 60/rate seconds."""
    from dicom_node.backfill.schedule import DailyWindow, Pacer, days, parse_day

    window = DailyWindow.parse("20:00-06:00")
    assert window.is_open(datetime(2024, 1, 1, 23, 0)) and window.is_open(datetime(2024, 1, 2, 5, 59))
    assert not window.is_open(datetime(2024, 1, 2, 12, 0))
    assert window.next_opening(datetime(2024, 1, 2, 12, 0)) == datetime(2024, 1, 2, 20, 0)
    said: list[str] = []
    slept: list[float] = []
    pacer = Pacer(30, window, said.append, sleep=slept.append, now=lambda: datetime(2024, 1, 2, 19, 0))
    pacer.wait()
    assert slept == [3600.0] and "waiting until 2024-01-02 20:00" in said[0]
    pacer.wait()
    assert 1.5 < slept[-1] <= 2.0, "30 studies/min: 2 s apart"
    assert [f"{d:%d}" for d in days(parse_day("20240130"), parse_day("20240202"))] == ["30", "31", "01", "02"]
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        DailyWindow.parse("8-18")
