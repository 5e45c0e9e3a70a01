"""Preprocessed volumes of one split, held in memory and cached on disk.

Every row goes through the shared preprocessing (``model_export.preprocessing``) exactly once per
recipe: results are cached as ``.npy`` files keyed by the recipe and the source file's size and mtime,
so a training run, its ablations and ``medfinder evaluate`` pay for decoding once. Rows that fail
(missing file, unreadable volume, wrong dimensionality, empty report) go through the run's
:class:`~trainer.data.row_checks.RowPolicy`: skipped and counted, or the run stops, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from config.settings import PreprocessingSettings
from model_export.atomic_files import atomic_path
from model_export.preprocessing import VolumeError, preprocess_path
from trainer.data.manifest import ManifestRow
from trainer.data.row_checks import UNREADABLE, BadRow, RowPolicy, validate_manifest

logger = logging.getLogger(__name__)

@dataclass
class VolumeSet:
    """Rows that survived the checks and their preprocessed arrays ``[N, 1, D, H, W]`` (float16)."""

    rows: list[ManifestRow]
    arrays: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def reports(self) -> list[str]:
        return [row.report for row in self.rows]

    @property
    def labels(self) -> list[set[str]]:
        return [set(row.labels) for row in self.rows]


def recipe_key(spec: PreprocessingSettings) -> str:
    """A short stable hash of the preprocessing recipe: a new recipe never reads stale cache entries."""
    payload = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def _source_stamp(path: Path) -> str:
    """Size and mtime of a file, or of every file in a DICOM folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = hashlib.sha256()
    for file in files:
        stat = file.stat()
        stamp.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return stamp.hexdigest()[:16]


class PreprocessCache:
    """``cache_dir/<recipe>/<stamp>.npy`` files; writes are atomic (temp file + rename)."""

    def __init__(self, cache_dir: Path | None, spec: PreprocessingSettings) -> None:
        self.spec = spec
        self.folder = cache_dir / recipe_key(spec) if cache_dir is not None else None

    def load(self, row: ManifestRow) -> np.ndarray:
        """The preprocessed ``[1, D, H, W]`` array for ``row``, computed on a miss."""
        if self.folder is None:
            return preprocess_path(row.volume, self.spec)
        key = hashlib.sha256(f"{row.volume.resolve()}|{_source_stamp(row.volume)}".encode()).hexdigest()[:24]
        target = self.folder / f"{key}.npy"
        if target.exists():
            return np.load(target)
        array = preprocess_path(row.volume, self.spec).astype(np.float16)
        with atomic_path(target) as temporary:
            np.save(temporary, array)
        return array


def load_volume_set(
    rows: list[ManifestRow],
    spec: PreprocessingSettings,
    policy: RowPolicy,
    cache_dir: Path | None = None,
    progress: bool = True,
    description: str = "preprocess",
) -> VolumeSet:
    """Check, preprocess and stack ``rows``; bad rows go through ``policy`` with their row number."""
    checked = validate_manifest(rows, policy)
    cache = PreprocessCache(cache_dir, spec)
    kept: list[ManifestRow] = []
    arrays: list[np.ndarray] = []
    for row in tqdm(checked, desc=description, disable=not progress, leave=False):
        try:
            array = cache.load(row)
        except (VolumeError, OSError, ValueError) as exc:
            policy.handle(BadRow(row.row_number, row.volume_id, str(row.volume), UNREADABLE, str(exc)))
            continue
        kept.append(row)
        arrays.append(array.astype(np.float16, copy=False))
    shape = (0, 1, *spec.target_shape)
    stacked = np.stack(arrays) if arrays else np.zeros(shape, dtype=np.float16)
    return VolumeSet(kept, stacked)
