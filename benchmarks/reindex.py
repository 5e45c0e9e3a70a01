"""Reindex throughput: studies/min re-embedded by ``medfinder reindex`` vs the initial embedding of the same studies.

An in-process node (embedded mode, real SCP, its own data folder) receives N copies of the 30-slice lung study
(Lung_Dx-A0002 series 2, new UIDs per copy) from dcmtk ``storescu``; the initial rate is N over the time from the
first study dispatched to the last outcome written (all sent in one association, so their quiet timers run out
together and the pass is not paced by arrivals). Then a reindex job (as ``medfinder reindex`` writes it) to a
second bundle — the same model under another id (a copy with one extra file), so both passes do the same
compute — is timed from the node picking it up to the switch (``job.started_at`` -> ``job.finished_at``).
Both passes use the same worker threads (``workers.embedded_threads``, ONNX ``workers.onnx_threads``); while the
reindex runs the node serves nothing else, so the ratio shows the reindex's own overhead (polling, batching,
the follower bookkeeping, the switch).

    python -m benchmarks reindex [--studies 8] [--bundle DIR] [--threads 2]

``--bundle`` defaults to the active bundle of ``paths.data_dir`` (the reference bundle after ``make bundle``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from config import load_settings
from config.settings import default_shared_data_dir

SERIES = "Lung_Dx-A0002_series2_B70f"


def copies(source: Path, out: Path, count: int) -> list[Path]:
    """``count`` copies of a series, each a new study (new Study/Series/SOP Instance UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    folders = []
    for n in range(count):
        folder = out / f"study-{n:03d}"
        folder.mkdir(parents=True)
        study, series = generate_uid(), generate_uid()
        for path in sorted(source.glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name)
        folders.append(folder)
    return folders


def clone_under_new_id(bundle: Path, out: Path) -> Path:
    """The same model as another bundle id: a copy with one extra file, its manifest finalised again."""
    from model_export.bundle_manifest import MANIFEST_FILE, finalize_manifest

    shutil.copytree(bundle, out)
    (out / "benchmark-clone.txt").write_text("a copy for benchmarks/reindex.py: same model, another id\n")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    finalize_manifest(out, manifest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reindex", description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the active bundle of paths.data_dir)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX threads per embedding (2 cores: 2)")
    args = parser.parse_args(argv)

    from dicom_node.lifecycle.jobs import JobKind, JobState, JobStore
    from dicom_node.node import Node
    from model_export.errors import BundleError
    from model_export.registry import active_bundle_path, install_bundle

    try:
        bundle = args.bundle or active_bundle_path(load_settings(None))
    except BundleError as error:
        print(f"reindex benchmark: {error} (or pass --bundle DIR)", file=sys.stderr)
        return 1
    source = default_shared_data_dir() / "ct" / "lung-pet-ct-dx" / SERIES
    if shutil.which("storescu") is None or not source.is_dir():
        print("reindex benchmark: needs dcmtk storescu and the shared lung-pet-ct-dx data", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="medfinder-reindex-bench-") as tmp:
        work = Path(tmp)
        data_dir = work / "node-data"
        bundle_a = install_bundle(bundle, data_dir, activate=True).name
        bundle_b = install_bundle(clone_under_new_id(bundle, work / "clone"), data_dir).name
        folders = copies(source, work / "studies", args.studies)
        settings = load_settings(None, overrides={
            "paths": {"data_dir": str(data_dir)},
            "node": {"bind": "127.0.0.1", "port": 0, "quiet_seconds": 2.0, "poll_interval_s": 0.05},
            "selection": {"min_slices": 20},
            "workers": {"embedded_threads": 1, "onnx_threads": args.threads},
            "api": {"http_port": 0},
        })
        node = Node(settings)
        node.start()
        try:
            # One association for all, so every study's quiet timer runs out together: the initial pass then
            # embeds back to back, as the reindex does (not paced by arrivals).
            sent = subprocess.run(["storescu", "-aec", settings.node.ae_title, "+sd", "+r", "127.0.0.1",
                                   str(node.scp.port), *map(str, folders)], capture_output=True, text=True,
                                  timeout=600, check=False)
            if sent.returncode != 0:
                print(sent.stdout + sent.stderr, file=sys.stderr)
                return 1
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline and sum(
                    s.state.value in ("reported", "indexed") for s in node.store.studies()) < args.studies:
                time.sleep(0.2)
            rows = node.store.studies()
            finished = [json.loads(node.layout.outcome_path(r.study_uid, r.version).read_text())["finished_at"]
                        for r in rows]
            initial_s = max(finished) - min(r.dispatched_at or 0.0 for r in rows)
            jobs = JobStore(data_dir)
            job = jobs.request(JobKind.REINDEX, bundle_b)
            while time.monotonic() < deadline:
                current = jobs.job(job.id)
                assert current is not None
                if not current.open:
                    break
                time.sleep(0.1)
            if current.state != JobState.DONE or current.started_at is None or current.finished_at is None:
                print(f"reindex benchmark: job ended {current.state.value}: {current.message}", file=sys.stderr)
                return 1
            reindex_s = current.finished_at - current.started_at
            served = node.bundle_id
            jobs.close()
        finally:
            node.stop()
    initial_rate, reindex_rate = 60 * args.studies / initial_s, 60 * args.studies / reindex_s
    print(f"reindex throughput ({args.studies} studies of {SERIES}, bundle {bundle_a} -> {bundle_b} "
          f"(same model), 1 worker thread x {args.threads} ONNX threads, {len(os.sched_getaffinity(0))}"
          " cores)")
    print(f"  initial embedding: {initial_s:7.1f} s  {initial_rate:7.1f} studies/min")
    print(f"  reindex + switch:  {reindex_s:7.1f} s  {reindex_rate:7.1f} studies/min")
    print(f"  ratio reindex/initial: {reindex_rate / initial_rate:.2f}  (serving after the switch: {served})")
    return 0 if served == bundle_b else 1


if __name__ == "__main__":
    sys.exit(main())
