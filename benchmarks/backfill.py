"""Backfill rate: ``medfinder backfill`` (C-FIND per day + one C-MOVE per study) from a local dcmtk ``dcmqrscp``
into the node's StorageSCP, vs dcmtk ``movescu`` moving the same studies (one C-MOVE per study) from the same
dcmqrscp to a dcmtk ``storescp``.

``--studies`` synthetic CT studies (one series of ``--slices`` 512x512 uint16 slices each, CT Image Storage,
Explicit VR Little Endian; one study date) are indexed into dcmqrscp (``dcmqridx``; max PDU 65536, which both
sides get). The node side is the node's StorageSCP and state store in this process (the backfill reads its
state store for completeness; no bundle is needed, so nothing is embedded meanwhile), the backfill is the real
``medfinder backfill`` command in its own process (its query phase and Python start included, as an operator
would see). ``movescu -> node SCP`` moves the same studies into the node's SCP with dcmtk, to show which share
of the time is the receiving side's (pynetdicom) rather than the backfill's. The reference is ``movescu -S -k StudyInstanceUID=...`` per study, run one after the other. Every run
starts from an empty receiver and is checked to have received every instance. All on 127.0.0.1,
``TCP_NODELAY=1`` for the dcmtk tools. Reports studies/min, MB/s (median of ``--repeats``) and ours/dcmtk.

    python -m benchmarks backfill [--studies 6] [--slices 60] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.receive_throughput import (
    free_port,
    generate_series,
    nodelay_env,
    wait_port,
)

STUDY_DATE = "20260101"  # generate_series's StudyDate
REPO = Path(__file__).resolve().parent.parent


def make_archive(work: Path, studies: int, slices: int) -> tuple[Path, list[str], int]:
    """Generate the studies, index them for dcmqrscp; (storage folder, study UIDs, total bytes)."""
    import pydicom

    storage = work / "PACS"
    storage.mkdir(parents=True)
    total, uids, files = 0, [], []
    for index in range(studies):
        folder = work / f"study-{index}"
        total += generate_series(folder, slices)
        for path in sorted(folder.glob("*.dcm")):
            target = storage / f"{index}-{path.name}"
            path.rename(target)
            files.append(str(target))
        uids.append(str(pydicom.dcmread(storage / f"{index}-0000.dcm", stop_before_pixels=True).StudyInstanceUID))
    subprocess.run(["dcmqridx", str(storage), *files], check=True, capture_output=True, timeout=600)
    return storage, uids, total


def start_dcmqrscp(work: Path, storage: Path, node_port: int, storescp_port: int) -> tuple[subprocess.Popen, int]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from node_helpers import write_dcmqrscp_config

    port = free_port()
    config = write_dcmqrscp_config(work / "dcmqrscp.cfg", port, storage,
                                   {"node": ("MEDFINDER", node_port), "dcmtk": ("STORESCP", storescp_port)})
    with open(work / "dcmqrscp.log", "wb") as log:
        process = subprocess.Popen(["dcmqrscp", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   env=nodelay_env())
    wait_port(port)
    return process, port


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def node_scp(work: Path, node_port: int) -> Iterator[tuple[Path, Path]]:
    """A fresh node StorageSCP + state store in this process; yields (its config file, its spool)."""
    import yaml

    from config import load_settings
    from dicom_node.receive.scp import StorageSCP
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    data_dir = Path(tempfile.mkdtemp(dir=work, prefix="node-"))
    node = {"bind": "127.0.0.1", "port": node_port, "min_free_disk_mb": 0, "ae_title": "MEDFINDER"}
    settings = load_settings(overrides={"paths": {"data_dir": str(data_dir)}, "node": node}, environ={})
    config = data_dir / "node.yaml"
    config.write_text(yaml.safe_dump({"paths": {"data_dir": str(data_dir)}, "node": node}), encoding="utf-8")
    layout = NodeLayout.create(data_dir)
    store = StateStore(layout.state_db)
    scp = StorageSCP(settings, layout, store)
    scp.start()
    try:
        yield config, layout.spool
    finally:
        scp.stop()
        store.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def run_ours(work: Path, qr_port: int, node_port: int, expected: int) -> float:
    """``medfinder backfill`` into a fresh node SCP; seconds of the command."""
    with node_scp(work, node_port) as (config, spool):
        started = time.perf_counter()
        result = subprocess.run([str(Path(sys.executable).parent / "medfinder"), "--log-level", "WARNING",
                                 "backfill", "--config", str(config), "--from", f"PACS@127.0.0.1:{qr_port}",
                                 "--since", STUDY_DATE, "--until", STUDY_DATE], capture_output=True, text=True,
                                timeout=1800, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"medfinder backfill failed: {(result.stdout + result.stderr)[-1500:]}")
        received = len(list(spool.glob("*/*/*.dcm")))
    if received != expected:
        raise RuntimeError(f"the node spooled {received} of {expected} instances")
    return seconds


def movescu_all(qr_port: int, destination: str, uids: list[str]) -> float:
    """One movescu per study, in sequence; seconds of all of them."""
    started = time.perf_counter()
    for uid in uids:
        result = subprocess.run(["movescu", "-S", "-aet", "BENCH", "-aec", "PACS", "-aem", destination,
                                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1",
                                 str(qr_port)], capture_output=True, text=True, env=nodelay_env(), timeout=600,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"movescu failed: {result.stderr[-1500:]}")
    return time.perf_counter() - started


def run_movescu_to_node(work: Path, qr_port: int, node_port: int, uids: list[str], expected: int) -> float:
    """movescu into a fresh node SCP: the receiving side's share of the backfill's time."""
    with node_scp(work, node_port) as (_config, spool):
        seconds = movescu_all(qr_port, "MEDFINDER", uids)
        received = len(list(spool.glob("*/*/*.dcm")))
    if received != expected:
        raise RuntimeError(f"the node spooled {received} of {expected} instances")
    return seconds


def run_dcmtk(work: Path, qr_port: int, storescp_port: int, uids: list[str], expected: int) -> float:
    """A fresh storescp; one movescu per study, in sequence; seconds of all the movescu runs."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="storescp-"))
    with open(work / "storescp.log", "ab") as log:
        receiver = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(storescp_port)],
                                    stdout=log, stderr=subprocess.STDOUT, env=nodelay_env())
    try:
        wait_port(storescp_port)
        seconds = movescu_all(qr_port, "STORESCP", uids)
    finally:
        stop(receiver)
    received = len([p for p in out.iterdir() if p.is_file()])
    shutil.rmtree(out, ignore_errors=True)
    if received != expected:
        raise RuntimeError(f"storescp wrote {received} of {expected} instances")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    missing = [t for t in ("dcmqrscp", "dcmqridx", "movescu", "storescp") if shutil.which(t) is None]
    if missing:
        print(f"backfill: skipped, {', '.join(missing)} not installed (make setup installs dcmtk)")
        return 0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dicom_node").setLevel(logging.ERROR)  # the open allow-list warning, once per run
    expected = args.studies * args.slices
    with tempfile.TemporaryDirectory(prefix="medfinder-backfill-bench-") as tmp:
        work = Path(tmp)
        storage, uids, total_bytes = make_archive(work, args.studies, args.slices)
        node_port, storescp_port = free_port(), free_port()
        qr, qr_port = start_dcmqrscp(work, storage, node_port, storescp_port)
        try:
            runs = {"medfinder backfill": lambda: run_ours(work, qr_port, node_port, expected),
                    "movescu -> node SCP": lambda: run_movescu_to_node(work, qr_port, node_port, uids, expected),
                    "dcmtk movescu": lambda: run_dcmtk(work, qr_port, storescp_port, uids, expected)}
            for run in runs.values():  # warm-up: page cache, imports
                run()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # interleaved: drift on a shared machine hits both alike
                for name, run in runs.items():
                    times[name].append(run())
        finally:
            stop(qr)
    megabytes = total_bytes / 1e6
    rows: dict[str, dict[str, Any]] = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows[name] = {"seconds_median": median, "seconds": seconds, "studies_per_min": 60 * args.studies / median,
                      "mb_per_s": megabytes / median}
    reference = rows["dcmtk movescu"]["studies_per_min"]
    for row in rows.values():
        row["ratio_vs_dcmtk"] = row["studies_per_min"] / reference
    print(f"Backfill rate: {args.studies} studies x {args.slices} slices 512x512 ({megabytes:.1f} MB) from dcmqrscp "
          f"on 127.0.0.1, one C-MOVE per study, median of {args.repeats}")
    print(f"{'mover':20} {'s':>7} {'studies/min':>12} {'MB/s':>7} {'ours/dcmtk':>10}")
    for name, row in rows.items():
        print(f"{name:20} {row['seconds_median']:7.2f} {row['studies_per_min']:12.1f} {row['mb_per_s']:7.1f} "
              f"{row['ratio_vs_dcmtk']:10.2f}")
    result = {"benchmark": "backfill", "studies": args.studies, "slices": args.slices, "bytes": total_bytes,
              "repeats": args.repeats, "python": sys.version.split()[0], "movers": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
