"""Load a multi-frame CT series (Enhanced CT, Legacy Converted Enhanced CT) into a :class:`Volume`.

highdicom 0.28 does the work it covers: it reads the functional groups, decodes the frames, applies the
Pixel Value Transformation (HU) and, for a regularly spaced untilted stack, gives the volume and its affine
(``highdicom.imread(path).get_volume()``). Our own :mod:`.slice_assembly` is used only where highdicom refuses
a volume — uneven slice spacing, gantry tilt (frames drifting in-plane), duplicate positions — or where one
series is split over several multi-frame objects; the frames still come from highdicom, so HU values are the
same either way.

The result follows the same conventions as :func:`.dicom_series.load_dicom_series` (slices ordered along
``+normal = row x col``, RAS affine, the same ``meta`` keys), so a multi-frame object and the single-frame
series it was made from give the same array and affine, and therefore the same embedding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from .slice_assembly import assemble_stack
from .volume import (
    MixedSeriesError,
    PixelDecodeError,
    TooFewSlicesError,
    Volume,
    VolumeError,
)

__all__ = ["load_multiframe_series"]

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DUPLICATE_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-4
# Exceptions highdicom raises when frames do not form a regular, untilted volume (or a value is malformed).
_NOT_A_VOLUME = (RuntimeError, ValueError, KeyError, AttributeError, IndexError, TypeError)
# What highdicom must not apply: we want stored values through the modality (HU) transform only.
_HU_ONLY: dict[str, Any] = {"dtype": np.float32, "apply_real_world_transform": False, "apply_voi_transform": False,
                            "apply_presentation_lut": False, "apply_palette_color_lut": False,
                            "apply_icc_profile": False}


def _read(path: Path) -> hd.Image:
    try:
        return hd.imread(str(path))
    except Exception as exc:  # highdicom/pydicom raise assorted errors on malformed objects
        raise VolumeError(f"{path}: cannot read multi-frame image ({type(exc).__name__}: {exc})") from exc


def _frame_attribute(image: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """A functional-group attribute of one frame: its per-frame item, else the shared item (PS3.3 C.7.6.16)."""
    per_frame = image.get("PerFrameFunctionalGroupsSequence") or []
    shared = image.get("SharedFunctionalGroupsSequence") or []
    for group in (per_frame[frame] if frame < len(per_frame) else None, shared[0] if shared else None):
        items = group.get(sequence) if group is not None else None
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _floats(value: Any, count: int, what: str, source: str) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{source}: {what} is missing or not numeric ({value!r})") from exc
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise VolumeError(f"{source}: malformed {what} ({value!r}); cannot place the frames in space")
    return numbers


def _check_image(image: hd.Image, path: Path) -> None:
    if int(image.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError(f"{path}: colour image (SamplesPerPixel={image.SamplesPerPixel}); expected greyscale CT")
    if "PixelData" not in image and "FloatPixelData" not in image and "DoubleFloatPixelData" not in image:
        raise VolumeError(f"{path}: multi-frame object has no pixel data")


def _from_highdicom(image: hd.Image, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The stack ``[slice, row, column]`` and LPS affine from highdicom, ordered along ``+row x col``; None when
    highdicom does not see one regular untilted volume (our assembly takes over)."""
    try:
        volume = image.get_volume(**_HU_ONLY)
    except _NOT_A_VOLUME as exc:
        log.info("%s: highdicom gives no regular volume (%s); assembling the frames ourselves", path, exc)
        return None
    if volume.array.ndim != 3:
        return None
    affine = np.asarray(volume.affine, dtype=np.float64)
    slice_vector, column_vector, row_vector = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    if float(slice_vector @ np.cross(row_vector, column_vector)) < 0:
        volume = volume.flip_spatial(0)  # our convention: slices ascend along the orientation normal
        affine = np.asarray(volume.affine, dtype=np.float64)
    return np.asarray(volume.array, dtype=np.float32), affine


def _frames_of(image: hd.Image, path: Path) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Every frame's HU pixels (decoded by highdicom) and position, and the object's orientation and spacing."""
    frames, positions = [], []
    orientation = spacing = None
    for k in range(int(image.get("NumberOfFrames") or 1)):
        this_orientation = _floats(_frame_attribute(image, k, "PlaneOrientationSequence", "ImageOrientationPatient"),
                                   6, "ImageOrientationPatient", str(path))
        this_spacing = _floats(_frame_attribute(image, k, "PixelMeasuresSequence", "PixelSpacing"), 2,
                               "PixelSpacing", str(path))
        if orientation is None:
            orientation, spacing = this_orientation, this_spacing
        elif not np.allclose(this_orientation, orientation, atol=_ORIENTATION_TOLERANCE) or not np.allclose(
                this_spacing, spacing, atol=1e-4):
            raise MixedSeriesError(f"{path}: frames differ in orientation or pixel spacing; not one volume")
        positions.append(_floats(_frame_attribute(image, k, "PlanePositionSequence", "ImagePositionPatient"), 3,
                                 "ImagePositionPatient", str(path)))
        try:
            frames.append(np.asarray(image.get_frame(k, as_index=True, **_HU_ONLY), dtype=np.float32))
        except Exception as exc:  # decoder errors vary by codec
            raise PixelDecodeError(f"{path}: cannot decode frame {k + 1}: {type(exc).__name__}: {exc}") from exc
    assert orientation is not None and spacing is not None
    return frames, positions, orientation, spacing


def _assemble(images: list[tuple[hd.Image, Path]], label: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Our own assembly (uneven spacing, tilt, duplicates, several objects): sort, deduplicate, regularise."""
    frames: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    orientation = spacing = None
    for image, path in images:
        more, where, this_orientation, this_spacing = _frames_of(image, path)
        if orientation is None:
            orientation, spacing = this_orientation, this_spacing
        elif not np.allclose(this_orientation, orientation, atol=_ORIENTATION_TOLERANCE) or not np.allclose(
                this_spacing, spacing, atol=1e-4):
            raise MixedSeriesError(f"{label}: multi-frame objects differ in orientation or pixel spacing")
        frames += more
        positions += where
    assert orientation is not None and spacing is not None
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MixedSeriesError(f"{label}: frames of different matrix sizes {sorted(shapes)}; not one volume")
    row_dir, col_dir = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(
        orientation[3:])
    along = np.array([p @ np.cross(row_dir, col_dir) for p in positions])
    order = np.argsort(along, kind="stable")
    kept = [int(order[0])]
    for i in order[1:]:
        if along[i] - along[kept[-1]] > _DUPLICATE_TOLERANCE_MM:
            kept.append(int(i))
    if len(kept) < len(frames):
        log.warning("%s: %d frame(s) share a position with another frame and were dropped", label,
                    len(frames) - len(kept))
    assembled = assemble_stack(np.stack([frames[i] for i in kept]), np.array([positions[i] for i in kept]), row_dir,
                               col_dir, (float(spacing[0]), float(spacing[1])), source=label)
    return assembled.stack, assembled.affine_lps, {**assembled.info, "duplicates_dropped": len(frames) - len(kept)}


def _regular_info(affine: np.ndarray, n: int) -> dict[str, Any]:
    gap = float(np.linalg.norm(affine[:3, 0]))
    info: dict[str, Any] = {"gantry_tilt_corrected": False, "slice_resampled": False, "gantry_tilt_deg": 0.0,
                            "slice_spacing_mm": gap, "duplicates_dropped": 0}
    if n > 1:
        info["slice_gap_mm"] = {"min": gap, "median": gap, "max": gap}
    return info


def load_multiframe_series(paths: Sequence[Path], *, label: str, min_slices: int = 1,
                           files_skipped: int = 0) -> Volume:
    """One series made of one (usually) or several multi-frame CT objects -> :class:`Volume` (frames = slices)."""
    images = [(_read(Path(p)), Path(p)) for p in sorted(paths)]
    for image, path in images:
        _check_image(image, path)
    first = images[0][0]
    for what in ("SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(image.get(what, "") or "") for image, _ in images}
        if len(values) > 1:
            raise MixedSeriesError(f"{label}: multi-frame objects of different {what}s")
    regular = _from_highdicom(first, images[0][1]) if len(images) == 1 else None
    if regular is not None:
        stack, hd_affine = regular
        info, geometry = _regular_info(hd_affine, stack.shape[0]), "highdicom"
        # highdicom's affine columns are (slice, row, column) indices; ours, like assemble_stack's, (column, row,
        # slice).
        affine_lps = hd_affine[:, [2, 1, 0, 3]]
    else:
        stack, affine_lps, info = _assemble(images, label)
        geometry = "assembled"
    if stack.shape[0] < min_slices:
        raise TooFewSlicesError(f"{label}: only {stack.shape[0]} distinct frame position(s) (need >= {min_slices})")
    modality = str(first.get("Modality", "") or "") or None
    if modality != "CT":
        log.warning("%s: modality is %s, not CT; Hounsfield windows may not be meaningful", label,
                    modality or "missing")
    n_frames = sum(int(image.get("NumberOfFrames") or 1) for image, _ in images)
    meta = {
        "format": "dicom",
        "modality": modality,
        "series_instance_uid": str(first.get("SeriesInstanceUID", "") or "") or None,
        "transfer_syntaxes": sorted({str(image.file_meta.get("TransferSyntaxUID", "")) for image, _ in images
                                     if hasattr(image, "file_meta")}),
        "n_files": len(images),
        "n_frames": n_frames,
        "n_slices": int(stack.shape[0]),
        "files_skipped": files_skipped,
        "multiframe_geometry": geometry,
        **info,
    }
    return Volume(array=np.ascontiguousarray(stack, dtype=np.float32).transpose(2, 1, 0),
                  affine=_LPS_TO_RAS @ affine_lps, source=label, meta=meta)
