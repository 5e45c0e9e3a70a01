"""Where a run's data comes from: the configured manifest, or the synthetic benchmark when none is set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import Settings
from trainer.data.manifest import ManifestRow, read_manifest, rows_in_split
from trainer.data.row_checks import RowPolicy
from trainer.data.splits import assign_patient_splits
from trainer.data.volumes import VolumeSet, load_volume_set

LUNG_CT_FOLDER = ("ct", "lung-pet-ct-dx")


@dataclass
class Splits:
    """The preprocessed train/val/test sets of one run and the manifest they came from."""

    manifest: Path
    train: VolumeSet
    val: VolumeSet
    test: VolumeSet | None

    def describe(self) -> dict[str, Any]:
        sizes = {"train": len(self.train), "val": len(self.val)}
        if self.test is not None:
            sizes["test"] = len(self.test)
        return {"manifest": str(self.manifest), "volumes": sizes}


def synthetic_dir(settings: Settings) -> Path:
    """``<work_dir>/synthetic-<hash of the benchmark settings>``: one folder per distinct benchmark."""
    payload = json.dumps(settings.data.synthetic.model_dump(mode="json"), sort_keys=True).encode()
    return Path(settings.paths.work_dir) / f"synthetic-{hashlib.sha256(payload).hexdigest()[:10]}"


def generate_synthetic(settings: Settings, out_dir: Path, progress: bool = True) -> Path:
    """The synthetic benchmark in ``out_dir`` (real backgrounds when the shared CT folder exists)."""
    from trainer.data.synthetic import generate_synthetic_benchmark

    ct_root = Path(settings.paths.shared_data).joinpath(*LUNG_CT_FOLDER)
    return generate_synthetic_benchmark(
        out_dir, settings.data.synthetic, ct_root if ct_root.is_dir() else None, progress=progress
    )


def resolve_manifest(settings: Settings, progress: bool = True) -> Path:
    """The configured manifest, or the synthetic benchmark (generated once, then reused)."""
    if settings.data.manifest is not None:
        return Path(settings.data.manifest)
    return generate_synthetic(settings, synthetic_dir(settings), progress)


def manifest_rows(manifest: Path) -> list[ManifestRow]:
    """Rows of a manifest with missing splits assigned deterministically by patient (70/10/20)."""
    return assign_patient_splits(read_manifest(manifest))


def cache_dir_for(settings: Settings, manifest: Path) -> Path | None:
    return Path(manifest).resolve().parent / ".preprocessed" if settings.data.cache_preprocessed else None


def load_splits(
    settings: Settings, policy: RowPolicy, progress: bool = True, context: Any = None, include_test: bool = False
) -> Splits:
    """Resolve, read and preprocess the manifest's splits (rank 0 first under DDP, so it owns the cache)."""
    is_main = context is None or context.is_main
    if not is_main:
        context.barrier()
    manifest = resolve_manifest(settings, progress=progress and is_main)
    rows = manifest_rows(manifest)
    cache = cache_dir_for(settings, manifest)
    spec = settings.preprocessing

    def load(split: str) -> VolumeSet:
        return load_volume_set(rows_in_split(rows, split), spec, policy, cache, progress and is_main, f"preprocess {split}")

    splits = Splits(manifest, load("train"), load("val"), load("test") if include_test else None)
    if is_main and context is not None:
        context.barrier()
    return splits
