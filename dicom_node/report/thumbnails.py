"""Thumbnails of a study's embedded series: one PNG per (series, window, size), for the pages and the PDF.

What is drawn: a 10 mm thin-slab projection around the middle axial slice, not a single slice. With the lung
window it is a maximum intensity projection (MIP): vessels become tubes and a nodule stays a blob, which is what
lets a reader tell them apart at 192 px; with the mediastinal window it is the slab's mean (noise down, no
blooming of calcium or contrast that a MIP would give). A slab thinner than one slice is just the middle slice.

The volume comes from the one shared loader (``model_export.preprocessing``: ``load_dicom_series`` then
``reorient_to_ras``), the same the encoder sees, and is shown in the radiological convention: patient right on
the image's left, anterior up. Pixels keep their physical aspect (voxel spacing) and are letterboxed (black) into
a square ``size``×``size`` PNG, so cards and table cells line up whatever the field of view. Once retention
deleted the spool (``retention.keep: volume``), the same picture is drawn from the kept HU volume
(:func:`series_image_source`): the volume is the one the loader made, so the thumbnail is identical.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import StateStore
from model_export.atomic_files import write_atomic
from model_export.preprocessing import (
    VolumeError,
    load_dicom_series,
    reorient_to_ras,
    window_to_range,
)
from workers.dicom_uids import InvalidUIDError, check_uid
from workers.volume_store import KEPT_SUFFIX, kept_volume_path, load_kept_volume, volume_folder

logger = logging.getLogger(__name__)

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}  # (level, width) HU
Window = Literal["lung", "mediastinum"]

SLAB_MM = 10.0
MIN_SIZE, MAX_SIZE = 16, 2048


class ThumbnailError(RuntimeError):
    """the series cannot be rendered (message says why; no PHI)"""


def _window_bounds(window: str) -> tuple[float, float]:
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; expected one of {sorted(WINDOWS)}")
    level, width = WINDOWS[window]
    return level - width / 2.0, level + width / 2.0


def _check_size(size: int) -> int:
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"thumbnail size must be between {MIN_SIZE} and {MAX_SIZE} pixels, got {size}")
    return int(size)


def _slab(array: np.ndarray, slice_mm: float, window: str) -> np.ndarray:
    """The 2D (i, j) projection of a ~SLAB_MM slab around the middle k (axial) index of a RAS array."""
    depth = array.shape[2]
    count = max(1, min(depth, round(SLAB_MM / slice_mm) if slice_mm > 0 else 1))
    start = max(0, min(depth - count, depth // 2 - count // 2))
    slab = array[:, :, start:start + count]
    if count == 1:
        return np.asarray(slab[:, :, 0])
    return slab.max(axis=2) if window == "lung" else slab.mean(axis=2, dtype=np.float32)


def render_thumbnail(series_dir: Path, *, window: Window = "lung", size: int = 192) -> bytes:
    """PNG of the middle axial slice of the series, loaded with the ONE shared preprocessing loader
    (model_export.preprocessing: load_dicom_series / reorient_to_ras), windowed, radiological display
    convention (patient right on image left, anterior up), aspect ratio from voxel spacing, fit into size×size.

    ``series_dir`` is a spooled series folder, or a kept volume (``.npz``, workers.volume_store).
    The "middle slice" is a 10 mm slab around it (MIP for lung, mean for mediastinum; module docstring).
    """
    low, high = _window_bounds(window)
    size = _check_size(size)
    source = Path(series_dir)
    try:
        loaded = load_kept_volume(source).volume if source.suffix == KEPT_SUFFIX else load_dicom_series(source)
        volume = reorient_to_ras(loaded)
    except VolumeError as exc:
        # The loader's message names files (UIDs) and reasons, never patient data; keep only its class here.
        raise ThumbnailError(f"the series cannot be loaded as a volume ({type(exc).__name__})") from exc
    except OSError as exc:
        raise ThumbnailError(f"the series cannot be read ({type(exc).__name__})") from exc
    spacing_i, spacing_j, spacing_k = volume.spacing
    plane = _slab(volume.array, spacing_k, window)  # axes (i → Right, j → Anterior)
    # Rows: anterior at the top (j descending); columns: patient right on the left (i descending).
    image = np.ascontiguousarray(plane.T[::-1, ::-1])
    grey = window_to_range(image, (low, high), (0.0, 255.0))
    pixels = np.rint(grey).astype(np.uint8)

    width_mm, height_mm = image.shape[1] * spacing_i, image.shape[0] * spacing_j
    scale = size / max(width_mm, height_mm)
    out_w, out_h = max(1, round(width_mm * scale)), max(1, round(height_mm * scale))
    picture = Image.fromarray(pixels, mode="L").resize((out_w, out_h), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(picture, ((size - out_w) // 2, (size - out_h) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class ThumbnailCache:
    """Rendered thumbnails on disk (``NodeLayout.thumbnails``), rendered once per key even under concurrency.

    A cached file older than its series folder is rendered again: more instances of the series arrived (a new
    study version) after it was drawn. Deleting the folder is always safe.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str, str, int], threading.Lock] = {}

    def path(self, study_uid: str, series_uid: str, *, window: Window, size: int) -> Path:
        """Where the thumbnail of (study, series, window, size) is cached (UIDs checked: they become names)."""
        study = check_uid(study_uid, "StudyInstanceUID")
        series = check_uid(series_uid, "SeriesInstanceUID")
        _window_bounds(window)
        return self.root / study / f"{series}-{window}-{_check_size(size)}.png"

    def _lock(self, key: tuple[str, str, str, int]) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    @staticmethod
    def _fresh(cached: Path, series_dir: Path) -> bytes | None:
        try:
            if cached.stat().st_mtime_ns >= Path(series_dir).stat().st_mtime_ns:
                return cached.read_bytes()
        except FileNotFoundError:
            return None
        return None

    def get(self, study_uid: str, series_uid: str, series_dir: Path, *, window: Window, size: int) -> bytes:
        """cached at root/<study>/<series>-<window>-<size>.png (atomic write via model_export.atomic_files);
        concurrent callers for the same key render once (per-key lock)."""
        cached = self.path(study_uid, series_uid, window=window, size=size)
        data = self._fresh(cached, series_dir)
        if data is not None:
            return data
        with self._lock((study_uid, series_uid, window, int(size))):
            data = self._fresh(cached, series_dir)  # another caller may have rendered it while we waited
            if data is not None:
                return data
            try:
                drawn_from = Path(series_dir).stat().st_mtime_ns
            except FileNotFoundError as exc:
                raise ThumbnailError("the series is no longer held (spool or kept volume)") from exc
            data = render_thumbnail(Path(series_dir), window=window, size=size)
            write_atomic(cached, data)
            # Stamp the file with the folder's time *before* drawing: an instance that arrived meanwhile makes the
            # folder newer, so the next call draws again.
            os.utime(cached, ns=(drawn_from, drawn_from))
            return data


def series_image_source(layout: NodeLayout, study_uid: str, series_uid: str) -> Path | None:
    """What a series' picture is drawn from: its spool folder, else its kept volume; None when the node holds
    neither (retention.keep none, or an unknown series). UIDs are checked (ValueError)."""
    series_dir = layout.study_spool(study_uid) / check_uid(series_uid, "SeriesInstanceUID")
    if series_dir.is_dir():
        return series_dir
    kept = kept_volume_path(volume_folder(layout.root, study_uid), series_uid)
    return kept if kept.is_file() else None


def study_thumbnail(layout: NodeLayout, store: StateStore, cache: ThumbnailCache, study_uid: str, *,
                    window: Window, size: int) -> bytes | None:
    """the thumbnail of the study's embedded series (StateStore.study(uid).series_uid, spool folder
    layout.study_spool(uid)/series_uid, else its kept volume); None when the node holds no image of it.

    Raises :class:`ThumbnailError` when the series is there but cannot be drawn.
    """
    try:
        study_uid = check_uid(study_uid, "StudyInstanceUID")
    except InvalidUIDError:
        return None
    row = store.study(study_uid)
    if row is None or not row.series_uid:
        return None
    try:
        series_uid = check_uid(row.series_uid, "SeriesInstanceUID")
    except InvalidUIDError:
        return None
    source = series_image_source(layout, study_uid, series_uid)
    if source is None:
        return None
    return cache.get(study_uid, series_uid, source, window=window, size=size)
