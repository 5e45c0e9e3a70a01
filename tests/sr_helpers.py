"""Helpers for the SR and delivery tests: a synthetic query header, free ports, a real dcmtk storescp."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from config.settings import ResultSettings
from dicom_node.similar_case_sr import SimilarCase, build_similar_case_sr


def require_tool(name: str) -> str:
    """The path of a Debian tool that ``make setup`` installs; skip with the reason if it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (run `make setup`: it installs dcmtk and dicom3tools)")
    return path


def synthetic_ct_header(patient_id: str = "DELIVERY-TEST", study_uid: str | None = None) -> Dataset:
    """A CT instance header with the patient and study attributes an SR inherits (no pixels needed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-DELIVERY"
    ds.Modality = "CT"
    return ds


def write_sr(folder: Path, header: Dataset | None = None, version: int = 1) -> tuple[Path, pydicom.Dataset]:
    """Build one similar-case SR for ``header`` and save it as a DICOM file; returns (path, dataset)."""
    header = header if header is not None else synthetic_ct_header()
    matches = [SimilarCase(rank=1, score=0.91, study_uid=generate_uid(), accession="ACC-1", study_date="20230405",
                           description="CT CHEST")]
    sr = build_similar_case_sr(header, matches, bundle_id="test-bundle-0001", bundle_name="test-bundle",
                               bundle_version="1.0.0", result_version=version, settings=ResultSettings())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sr.SOPInstanceUID}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path, sr


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen | None = None, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"listener on port {port} exited early with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@contextmanager
def storescp(port: int, out_dir: Path, ae_title: str = "PACS") -> Iterator[subprocess.Popen]:
    """A real dcmtk storescp (the "PACS") writing received objects bit-preserved into ``out_dir``.

    ``TCP_NODELAY=1``: Debian's DCMTK otherwise waits ≈45 ms per object for Nagle (field notes 4.4).
    """
    binary = require_tool("storescp")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    process = subprocess.Popen([binary, "--aetitle", ae_title, "--output-directory", str(out_dir),
                                "--bit-preserving", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its File Meta Information (what travelled over the network)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a DICOM Part 10 file"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR: value at 140
    return data[144 + group_length:]
