"""The synthetic paired benchmark: CT volumes with inserted findings, paired with report text.

Why it exists: no real paired CT + report data is available offline, yet training, ablations,
evaluation, demos and CI all need a dataset whose ground truth is known. Each volume is a unique
background (procedural phantom, or an augmented instance of a real Lung-PET-CT-Dx series) with the six
findings of :data:`~trainer.data.synthetic_findings.FINDINGS` inserted independently (~35% each),
and a report written from what was inserted.

Split hygiene (so the test split measures generalisation, not memorisation):

* ``train``: procedural backgrounds + instances of the *first* real patient (A0001) only;
* ``val``: procedural backgrounds only;
* ``test``: other procedural backgrounds + instances of the *second* real patient (A0002) only.

Every volume has its own background instance and its own lesion instances (ids recorded per volume in
``benchmark.json``), drawn from ``np.random.default_rng([seed, split_code, index])``, so the same
settings always give byte-identical reports and voxel arrays, and no split shares an instance.

Output layout (``generate_synthetic_benchmark``)::

    out_dir/volumes/<volume_id>.nii.gz   int16 HU, written as RAS, LPS or LAS (same physical content)
    out_dir/manifest.csv                 ManifestRow columns; patient_id = background instance id
    out_dir/benchmark.json               settings, counts, prevalence, per-volume ids; written LAST
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from config.settings import SyntheticSettings
from model_export.atomic_files import atomic_path, write_text_atomic
from trainer.data.manifest import ManifestRow, write_manifest

from .synthetic_anatomy import procedural_chest
from .synthetic_findings import FINDINGS, FindingSummary, Lesion, insert_findings
from .synthetic_real import RealSeries, load_real_bank, patient_of, real_instance
from .synthetic_reports import Report, compose_report

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.3.2"
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
REAL_SPLITS = ("train", "test")  # the i-th real patient (sorted) backs the i-th of these; val is procedural
ORIENTATIONS = ("RAS", "LPS", "LAS")
BENCHMARK_FILE = "benchmark.json"
MANIFEST_FILE = "manifest.csv"
VOLUMES_DIR = "volumes"
HU_RANGE = (-1024, 3071)
SPLIT_POLICY = (
    "train: procedural backgrounds + real instances of the first real patient only; "
    "val: procedural only; test: other procedural backgrounds + real instances of the second real patient only. "
    "Every volume has its own background instance and lesion instances."
)


@dataclass
class SyntheticCase:
    """One generated study, in memory: RAS float HU, what was inserted, and its report."""

    volume_id: str
    split: str
    index: int
    hu: np.ndarray  # float32 (i, j, k), RAS
    spacing: tuple[float, float, float]
    background_id: str
    background_source: str
    orientation: str  # how the NIfTI file is written
    lesions: list[Lesion]
    summaries: list[FindingSummary]
    report: Report
    background: np.ndarray | None = field(default=None, repr=False)  # HU before insertion (tests only)

    @property
    def labels(self) -> tuple[str, ...]:
        """The inserted findings, in :data:`FINDINGS` order (ground truth, never parsed from text)."""
        return tuple(s.finding for s in self.summaries)

    def record(self) -> dict[str, Any]:
        """The JSON-able per-volume record stored in benchmark.json."""
        return {
            "split": self.split,
            "index": self.index,
            "background_id": self.background_id,
            "background_source": self.background_source,
            "orientation": self.orientation,
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "labels": list(self.labels),
            "lesion_ids": [x.lesion_id for x in self.lesions],
            "lesions": [x.to_json() for x in self.lesions],
            "report_words": self.report.n_words,
            "report_sentences": [[s.section, s.kind, list(s.findings), s.text] for s in self.report.sentences],
        }


def real_patients_by_split(bank: Sequence[RealSeries]) -> dict[str, list[RealSeries]]:
    """Which real series each split may use: sorted patients map onto :data:`REAL_SPLITS` in order."""
    patients = sorted({s.patient for s in bank})
    out: dict[str, list[RealSeries]] = {split: [] for split in SPLIT_CODES}
    for split, patient in zip(REAL_SPLITS, patients):
        out[split] = [s for s in bank if s.patient == patient]
    return out


def generate_case(
    settings: SyntheticSettings,
    split: str,
    index: int,
    real_by_split: dict[str, list[RealSeries]] | None = None,
    keep_background: bool = False,
) -> SyntheticCase:
    """Generate one study deterministically from ``(settings.seed, split, index)``.

    The root generator is split into independent streams (background, findings, text, file layout)
    so that, e.g., a change to report templates cannot move a lesion.
    """
    root = np.random.default_rng([settings.seed, SPLIT_CODES[split], index])
    bg_rng, finding_rng, text_rng, io_rng = root.spawn(4)
    shape = tuple(int(n) for n in settings.volume_shape)
    candidates = (real_by_split or {}).get(split, [])
    tag = f"{settings.seed}-{split}-{index:05d}"
    use_real = bool(candidates) and bg_rng.random() < settings.real_background_fraction
    if use_real:
        series = candidates[int(bg_rng.integers(len(candidates)))]
        anatomy = real_instance(series, shape, bg_rng)  # type: ignore[arg-type]
        background_id = f"bg-{series.patient.lower()}-{tag}"
    else:
        anatomy = procedural_chest(shape, bg_rng)  # type: ignore[arg-type]
        background_id = f"bg-proc-{tag}"
    background = anatomy.hu.copy() if keep_background else None
    lesions, summaries = insert_findings(anatomy, finding_rng, id_prefix=f"les-{tag}")
    report = compose_report(summaries, text_rng)
    orientation = ORIENTATIONS[int(io_rng.integers(len(ORIENTATIONS)))]
    return SyntheticCase(
        volume_id=f"syn-{split}-{index:05d}",
        split=split,
        index=index,
        hu=anatomy.hu,
        spacing=anatomy.spacing,
        background_id=background_id,
        background_source=anatomy.source,
        orientation=orientation,
        lesions=lesions,
        summaries=summaries,
        report=report,
        background=background,
    )


def oriented_image(hu: np.ndarray, spacing: Sequence[float], orientation: str) -> nib.Nifti1Image:
    """An int16 NIfTI of RAS-ordered ``hu`` stored in ``orientation`` (RAS, LPS or LAS).

    The data are flipped and the affine's columns negated/shifted together, so every variant maps each
    voxel to the same RAS millimetre position: a loader that reorients correctly sees identical arrays.
    """
    data = np.clip(np.rint(hu), *HU_RANGE).astype(np.int16)
    shape = np.asarray(data.shape)
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = -(shape - 1) / 2.0 * np.asarray(spacing, dtype=np.float64)  # centred on the origin
    flips = {"RAS": (), "LAS": (0,), "LPS": (0, 1)}[orientation]
    for axis in flips:
        data = np.flip(data, axis=axis)
        affine[:3, 3] += affine[:3, axis] * (shape[axis] - 1)
        affine[:3, axis] *= -1.0
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.header.set_data_dtype(np.int16)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def discover_real_series(ct_root: Path | None) -> list[str]:
    """``<patient>/<folder>`` of the usable real series, without loading pixels (for the cache key)."""
    if ct_root is None or not Path(ct_root).is_dir():
        return []
    folders = sorted(p for p in Path(ct_root).iterdir() if p.is_dir() and any(p.glob("*.dcm")))
    return [f"{patient_of(p.name)}/{p.name}" for p in folders]


def _cache_key(settings: SyntheticSettings, real_series: list[str]) -> dict[str, Any]:
    """Everything that determines the generated files."""
    return {
        "generator_version": GENERATOR_VERSION,
        "settings": settings.model_dump(mode="json"),
        "real_series": real_series,
    }


def _cached_manifest(out_dir: Path, key: dict[str, Any]) -> Path | None:
    """The existing manifest when ``benchmark.json`` says it was generated with ``key`` and is complete."""
    record_path, manifest = out_dir / BENCHMARK_FILE, out_dir / MANIFEST_FILE
    if not record_path.is_file() or not manifest.is_file():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("cache_key") != key:
        return None
    volumes = out_dir / VOLUMES_DIR
    if not all((volumes / f"{vid}.nii.gz").is_file() for vid in record.get("volumes", {})):
        return None
    return manifest


def benchmark_prevalence(manifest_rows: Iterable[ManifestRow]) -> dict[str, float]:
    """Fraction of rows carrying each finding label (all :data:`FINDINGS`, plus any other label seen)."""
    rows = list(manifest_rows)
    counts: dict[str, int] = {f: 0 for f in FINDINGS}
    for row in rows:
        for label in row.labels:
            counts[label] = counts.get(label, 0) + 1
    return {label: (n / len(rows) if rows else 0.0) for label, n in counts.items()}


# Per-process state of a generation pool (set once by the initializer; fork shares the loaded real series).
_POOL_STATE: dict[str, Any] = {}


def _write_case(
    settings: SyntheticSettings,
    split: str,
    index: int,
    real_by_split: dict[str, list[RealSeries]],
    volumes_dir: Path,
) -> tuple[ManifestRow, dict[str, Any]]:
    """Generate one study, write its NIfTI atomically; returns its manifest row and benchmark record."""
    case = generate_case(settings, split, index, real_by_split)
    path = volumes_dir / f"{case.volume_id}.nii.gz"
    with atomic_path(path) as temporary:
        nib.save(oriented_image(case.hu, case.spacing, case.orientation), temporary)
    row = ManifestRow(case.volume_id, path, case.report.text, case.background_id, case.labels, split)
    return row, case.record()


def _pool_init(settings: SyntheticSettings, real_by_split: dict[str, list[RealSeries]], volumes_dir: Path) -> None:
    """Keep the generation context in the worker, so each task ships only ``(split, index)``."""
    _POOL_STATE.update(settings=settings, real_by_split=real_by_split, volumes_dir=volumes_dir)


def _pool_task(task: tuple[str, int]) -> tuple[ManifestRow, dict[str, Any]]:
    """One pool task: :func:`_write_case` with the worker's context."""
    state = _POOL_STATE
    return _write_case(state["settings"], task[0], task[1], state["real_by_split"], state["volumes_dir"])


def default_workers() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one), at most 8."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every OS
        available = os.cpu_count() or 1
    return max(1, min(8, available))


def _generate_all(
    tasks: Sequence[tuple[str, int]],
    settings: SyntheticSettings,
    real_by_split: dict[str, list[RealSeries]],
    volumes_dir: Path,
    workers: int | None,
) -> Iterable[tuple[ManifestRow, dict[str, Any]]]:
    """Rows and records in ``tasks`` order, generated in this process or in a pool of ``workers``.

    Why fork: the real series bank (tens of MB) is inherited instead of pickled into every worker; the
    workers use only numpy/scipy/nibabel, never torch, so forking a process that imported torch is safe.
    """
    count = default_workers() if workers is None else max(1, workers)
    count = min(count, len(tasks))
    methods = multiprocessing.get_all_start_methods()
    if count <= 1 or "fork" not in methods:
        for split, index in tasks:
            yield _write_case(settings, split, index, real_by_split, volumes_dir)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(count, initializer=_pool_init, initargs=(settings, real_by_split, volumes_dir)) as pool:
        yield from pool.imap(_pool_task, tasks, chunksize=4)


def generate_synthetic_benchmark(
    out_dir: Path,
    settings: SyntheticSettings,
    ct_root: Path | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Generate (or reuse) the benchmark in ``out_dir``; returns the manifest CSV path.

    Reuse: when ``benchmark.json`` records the same settings, generator version and real series, and
    every volume is present, the existing manifest is returned at once. Otherwise ``benchmark.json`` is
    removed first and written only after every volume and the manifest, so an interrupted run is never
    mistaken for a complete one. ``workers`` processes generate volumes (default: the CPUs this process
    may use); the files do not depend on it, since every volume has its own seeded generator.
    """
    out_dir = Path(out_dir)
    # with no real backgrounds wanted, neither load the series nor let their presence change the cache key
    real_names = discover_real_series(ct_root) if settings.real_background_fraction > 0 else []
    key = _cache_key(settings, real_names)
    cached = _cached_manifest(out_dir, key)
    if cached is not None:
        log.info("synthetic benchmark: reusing %s", cached)
        return cached

    started = time.perf_counter()
    volumes_dir = out_dir / VOLUMES_DIR
    volumes_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BENCHMARK_FILE).unlink(missing_ok=True)
    bank = load_real_bank(ct_root) if real_names else []
    if settings.real_background_fraction <= 0:
        log.info("synthetic benchmark: real_background_fraction is 0; procedural backgrounds only")
    elif ct_root is not None and not real_names:
        log.warning("synthetic benchmark: no usable real series under %s; procedural backgrounds only", ct_root)
    elif ct_root is None:
        log.warning("synthetic benchmark: no real CT folder given; procedural backgrounds only")
    real_by_split = real_patients_by_split(bank)

    plan = [("train", settings.n_train), ("val", settings.n_val), ("test", settings.n_test)]
    tasks = [(split, index) for split, count in plan for index in range(count)]
    rows: list[ManifestRow] = []
    records: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(tasks), desc="synthetic CT benchmark", disable=not progress, unit="vol") as bar:
        for row, record in _generate_all(tasks, settings, real_by_split, volumes_dir, workers):
            rows.append(row)
            records[row.volume_id] = record
            bar.update(1)

    keep = {f"{vid}.nii.gz" for vid in records}
    for stale in volumes_dir.glob("*.nii.gz"):
        if stale.name not in keep:
            stale.unlink()

    manifest = out_dir / MANIFEST_FILE
    with atomic_path(manifest) as temporary:
        write_manifest(temporary, rows, relative_to=out_dir)

    words = [r["report_words"] for r in records.values()]
    by_split = {split: [r for r in rows if r.split == split] for split, _ in plan}
    summary = {
        "generator_version": GENERATOR_VERSION,
        "cache_key": key,
        "settings": settings.model_dump(mode="json"),
        "seed": settings.seed,
        "split_policy": SPLIT_POLICY,
        "real_series_used": {split: [s.source for s in series] for split, series in real_by_split.items()},
        "counts": {split: len(split_rows) for split, split_rows in by_split.items()},
        "real_background_counts": {
            split: sum(1 for r in records.values() if r["split"] == split and r["background_source"] != "procedural")
            for split, _ in plan
        },
        "prevalence": {split: benchmark_prevalence(split_rows) for split, split_rows in by_split.items()},
        "report_words": {"min": min(words, default=0), "mean": float(np.mean(words)) if words else 0.0,
                         "max": max(words, default=0)},
        "generation_seconds": round(time.perf_counter() - started, 2),
        "volumes": records,
    }
    write_text_atomic(out_dir / BENCHMARK_FILE, json.dumps(summary, indent=1))
    log.info("synthetic benchmark: %d volumes in %.1f s -> %s", len(rows), summary["generation_seconds"], manifest)
    return manifest


def load_benchmark_record(out_dir: Path) -> dict[str, Any]:
    """The parsed ``benchmark.json`` of a generated benchmark (per-volume ids, lesions, sentences)."""
    return json.loads((Path(out_dir) / BENCHMARK_FILE).read_text(encoding="utf-8"))
