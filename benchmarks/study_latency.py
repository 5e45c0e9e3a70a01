"""Study latency: from the last instance received to the similar-case SR delivered, broken down.

A real ``medfinder serve`` (embedded mode, its own data folder) with the active bundle of ``paths.data_dir``
(the reference bundle after ``make bundle``; ``--bundle DIR`` for another) receives the 64-slice lung series
(Lung_Dx-A0001 series 2) from dcmtk ``storescu``, after the other patient's study (so the index is warm and
the SR has a match); a dcmtk ``storescp`` is the PACS. The peers are the test suite's (``tests/node_helpers.py``). The breakdown is read
back from the node's own records: the state database (instance arrival, delivery time) and the per-version
timing file the node writes beside the worker's outcome.

Phases: quiet wait (the configured quiet timer, then the tick that notices it), select (series selection on the
headers), decode (read + decode the chosen series), preprocess (the bundle's recipe), embed (ONNX), index
(upsert), search, SR (build + write), send (delivery queue pick-up + C-STORE to the PACS), and what is left
(polling between steps).

    python -m benchmarks.study_latency [--quiet-seconds 2] [--repeats 3] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from config import load_settings
from config.settings import default_shared_data_dir

QUERY_SERIES = "Lung_Dx-A0001_series2_5mm"
GALLERY_SERIES = ("Lung_Dx-A0002_series2_B70f",)


def _phases(data_dir: Path, study_uid: str, version: int) -> dict[str, float]:
    with sqlite3.connect(data_dir / "state.sqlite3") as db:
        last = db.execute("SELECT MAX(received_at) FROM instances WHERE study_uid = ?", (study_uid,)).fetchone()[0]
        delivered = db.execute("SELECT delivered_at FROM deliveries WHERE study_uid = ? AND version = ? ORDER BY id",
                               (study_uid, version)).fetchone()[0]  # the SR (queued before its PDF)
    report = json.loads((data_dir / "outcomes" / study_uid / f"v{version}.report.json").read_text())
    worker, node = report["worker"], report["node"]
    phases = {
        "quiet wait": report["quiet_wait_s"],
        "select": worker.get("select_s", 0.0),
        "decode": worker.get("decode_s", 0.0),
        "preprocess": worker.get("preprocess_s", 0.0),
        "embed": worker.get("embed_s", 0.0),
        "index": node.get("index_s", 0.0),
        "search": node.get("search_s", 0.0),
        "SR": node.get("sr_s", 0.0),
        "PDF companion": node.get("companion_s", 0.0),
        "send": delivered - report["reported_at"],
    }
    phases["total"] = delivered - last
    phases["other (polling, hand-offs)"] = phases["total"] - sum(v for k, v in phases.items() if k != "total")
    return phases


def run_once(bundle: Path, quiet_seconds: float, workdir: Path) -> dict[str, float]:
    from model_export.registry import install_bundle

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from node_helpers import free_port, start_node, stop_process, storescp, storescu, wait_for, write_node_config

    lung = default_shared_data_dir() / "ct" / "lung-pet-ct-dx"
    data_dir = workdir / "node-data"
    install_bundle(bundle, data_dir, activate=True)
    pacs_dir = workdir / "pacs"
    with storescp(pacs_dir) as pacs_port:
        config = write_node_config(workdir / "node.yaml", data_dir, pacs_port,
                                   node={"quiet_seconds": quiet_seconds, "poll_interval_s": 0.05},
                                   workers={"onnx_threads": None})
        port = free_port()
        node = start_node(config, port, workdir / "node.log")
        try:
            for name in GALLERY_SERIES:
                assert storescu(port, lung / name).returncode == 0
            wait_for(lambda: len(list(pacs_dir.glob("*"))) >= len(GALLERY_SERIES), 300, "the gallery's SRs")
            assert storescu(port, lung / QUERY_SERIES).returncode == 0
            wait_for(lambda: len(list(pacs_dir.glob("*"))) >= len(GALLERY_SERIES) + 1, 300, "the query's SR")
        finally:
            stop_process(node)
    import pydicom

    study_uid = str(pydicom.dcmread(next((lung / QUERY_SERIES).glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    return _phases(data_dir, study_uid, 1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks study_latency")
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the active bundle of paths.data_dir)")
    args = parser.parse_args(argv)
    from model_export.errors import BundleError
    from model_export.registry import active_bundle_path

    try:
        bundle = args.bundle or active_bundle_path(load_settings(None))
    except BundleError as error:
        print(f"study_latency: skipped: {error}")
        return 0
    runs: list[dict[str, float]] = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="medfinder-latency-") as tmp:
            runs.append(run_once(bundle, args.quiet_seconds, Path(tmp)))
        print(f"  run {repeat + 1}: total {runs[-1]['total']:.2f} s", file=sys.stderr)
    print(f"Study latency: last instance received -> SR delivered, 64-slice series {QUERY_SERIES} "
          f"(bundle {bundle.name[:12]}, quiet timer {args.quiet_seconds:g} s, median of {len(runs)})")
    median: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    for name, seconds in median.items():
        share = 100 * seconds / median["total"] if median["total"] else 0.0
        print(f"  {name:<28} {seconds * 1000:9.1f} ms  {share:5.1f} %")
    print(json.dumps({"benchmark": "study_latency", "median_s": median, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
