"""Receive throughput: the node's StorageSCP vs dcmtk ``storescp``, both fed by dcmtk ``storescu``.

Generated CT series (300 slices each, 512x512 uint16, valid CT Image Storage headers, Explicit VR Little Endian,
~157 MB, one study each) are sent to each receiver, each run into a fresh data folder on the temp file system,
all on 127.0.0.1, in two parts:

* one association: ``ours`` (StorageSCP as ``medfinder serve`` runs it, streaming to disk) vs ``storescp -od DIR``;
* ``--associations`` concurrent ones (8; one storescu per series, all started together): ``ours`` with
  ``node.receive_processes`` = ``--processes`` (default: the cores), ``ours`` in one process, vs
  ``storescp --fork`` (a process per association);
* ``--memory`` adds ours holding each dataset in memory (``stream_to_disk: false``).

``TCP_NODELAY=1`` is set for storescp and storescu (DCMTK 3.6.7 otherwise waits ~45 ms per instance). Time =
from the first storescu's start to the last one's exit (the same overhead for every receiver); the SCPs are
started before the clock, and every run is checked to have received (and, for ours, recorded) every file.
Reports MB/s, slices/s (median of the repeats) and the ratio to dcmtk with as many associations.

    python -m benchmarks receive_throughput [--repeats 3] [--slices 300] [--associations 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def generate_series(folder: Path, slices: int, size: int = 512) -> int:
    """Write a synthetic CT series (one study, one series); returns the total bytes of the files."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    base = (rng.normal(1000, 80, (size, size))).clip(0, 4095).astype(np.uint16)
    total = 0
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^RECEIVE", "BENCH0001", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "B1", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, index + 1
        ds.Modality, ds.Manufacturer, ds.PatientPosition = "CT", "MedFinder benchmark", "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-250.0, -250.0, -index * 1.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.9765625, 0.9765625], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
        ds.AcquisitionNumber = 1
        ds.PixelData = np.roll(base, index, axis=0).tobytes()
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def nodelay_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.3)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def send(port: int, folders: list[Path]) -> float:
    """One storescu per folder, all at once (one association each); seconds from the first start to the last
    exit."""
    started = time.perf_counter()
    senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", "MEDFINDER", "+sd", "127.0.0.1", str(port),
                                 str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=nodelay_env()) for folder in folders]
    errors = [sender.communicate(timeout=600)[1] for sender in senders]
    seconds = time.perf_counter() - started
    for sender, error in zip(senders, errors):
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {error[-1500:]}")
    return seconds


def run_ours(folders: list[Path], work: Path, *, processes: int = 0, stream: bool = True) -> float:
    from config import load_settings
    from dicom_node.receive.scp import StorageSCP
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    data_dir = Path(tempfile.mkdtemp(dir=work, prefix="ours-"))
    settings = load_settings(overrides={"paths": {"data_dir": str(data_dir)}, "node": {
        "bind": "127.0.0.1", "port": free_port(), "stream_to_disk": stream, "min_free_disk_mb": 0,
        "receive_processes": processes, "max_associations": max(10, len(folders) + 2)}}, environ={})
    layout = NodeLayout.create(data_dir)
    store = StateStore(layout.state_db)
    scp = StorageSCP(settings, layout, store)
    scp.start()
    try:
        seconds = send(scp.port, folders)
        received = len(list(layout.spool.glob("*/*/*.dcm")))
        recorded = sum(len(store.instances(study.study_uid)) for study in store.studies())
    finally:
        scp.stop()
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    expected = sum(len(list(folder.glob("*.dcm"))) for folder in folders)
    if received != expected or recorded != expected:
        raise RuntimeError(f"our SCP spooled {received} and recorded {recorded} of {expected} files")
    return seconds


def run_dcmtk(folders: list[Path], work: Path, *, fork: bool = False) -> float:
    out = Path(tempfile.mkdtemp(dir=work, prefix="dcmtk-"))
    port = free_port()
    log = open(work / f"storescp-{port}.log", "wb")
    process = subprocess.Popen(["storescp", "-aet", "MEDFINDER", "-od", str(out), *(["--fork"] if fork else []),
                                str(port)], stdout=log, stderr=subprocess.STDOUT, env=nodelay_env())
    try:
        wait_port(port)
        seconds = send(port, folders)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
    deadline = time.monotonic() + 10  # --fork: a child may still be closing its last file
    expected = sum(len(list(folder.glob("*.dcm"))) for folder in folders)
    received = 0
    while time.monotonic() < deadline:
        received = len([p for p in out.iterdir() if p.is_file()])
        if received >= expected:
            break
        time.sleep(0.05)
    shutil.rmtree(out, ignore_errors=True)
    if received != expected:
        raise RuntimeError(f"storescp wrote {received} of {expected} files")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--associations", type=int, default=8, help="concurrent senders in the second part")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2,
                        help="node.receive_processes for ours with concurrent senders (default: the cores)")
    parser.add_argument("--memory", action="store_true", help="also run ours without stream_to_disk")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("storescu", "storescp") if shutil.which(tool) is None]
    if missing:
        print(f"receive_throughput: skipped, {', '.join(missing)} not installed (make setup installs dcmtk)")
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dicom_node").setLevel(logging.ERROR)  # the open allow-list warning, once per run
    many = args.associations
    with tempfile.TemporaryDirectory(prefix="medfinder-receive-bench-") as tmp:
        work = Path(tmp)
        folders = [work / f"series-{index}" for index in range(max(1, many))]
        sizes = [generate_series(folder, args.slices) for folder in folders]  # distinct studies: no duplicates
        one = folders[:1]
        receivers: dict[str, tuple[int, Any]] = {
            "ours": (1, lambda: run_ours(one, work)),
            "dcmtk": (1, lambda: run_dcmtk(one, work)),
        }
        if args.memory:
            receivers["ours/memory"] = (1, lambda: run_ours(one, work, stream=False))
        if many > 1:
            receivers[f"ours x{many} ({args.processes} proc)"] = (
                many, lambda: run_ours(folders, work, processes=args.processes))
            receivers[f"ours x{many} (1 proc)"] = (many, lambda: run_ours(folders, work))
            receivers[f"dcmtk x{many} --fork"] = (many, lambda: run_dcmtk(folders, work, fork=True))
        for _, run in receivers.values():  # warm-up: page cache, imports, dcmtk dictionaries
            run()
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every receiver alike
            for name, (_, run) in receivers.items():
                times[name].append(run())
    rows: dict[str, dict[str, Any]] = {}
    for name, seconds in times.items():
        count = receivers[name][0]
        median = statistics.median(seconds)
        megabytes = sum(sizes[:count]) / 1e6
        rows[name] = {"associations": count, "seconds_median": median, "seconds": seconds,
                      "mb_per_s": megabytes / median, "slices_per_s": args.slices * count / median}
    reference = {1: rows["dcmtk"]["mb_per_s"]}
    if many > 1:
        reference[many] = rows[f"dcmtk x{many} --fork"]["mb_per_s"]
    for row in rows.values():
        row["ratio_vs_dcmtk"] = row["mb_per_s"] / reference[row["associations"]]
    print(f"Receive throughput: {args.slices} slices 512x512 uint16 per association ({sizes[0] / 1e6:.1f} MB), "
          f"storescu -> receiver on 127.0.0.1, TCP_NODELAY=1, median of {args.repeats}, {os.cpu_count()} cores")
    print(f"{'receiver':24} {'assoc':>5} {'s':>7} {'MB/s':>8} {'slices/s':>9} {'vs dcmtk':>8}")
    for name, row in rows.items():
        print(f"{name:24} {row['associations']:5d} {row['seconds_median']:7.2f} {row['mb_per_s']:8.1f} "
              f"{row['slices_per_s']:9.1f} {row['ratio_vs_dcmtk']:8.2f}")
    print("(vs dcmtk: one association against storescp; concurrent ones against storescp --fork)")
    result = {"benchmark": "receive_throughput", "slices": args.slices, "bytes_per_association": sizes[0],
              "repeats": args.repeats, "cores": os.cpu_count(), "python": sys.version.split()[0], "receivers": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
