"""The preprocessing recipe: any loaded volume -> the model's ``[1, D, H, W]`` float32 input.

Training and serving both call :func:`preprocess_volume` with the bundle's ``PreprocessingSettings``,
so a model never sees arrays prepared differently from those it was trained on. Steps, in order:
reorient to RAS -> optional resample to ``target_spacing_mm`` -> optional foreground crop -> HU window
mapped to ``output_range`` -> resize to ``target_shape``. Deterministic (no randomness, no threads).

``fit: crop_or_pad`` (imported encoders such as COLIPRI) keeps voxels at their physical size instead: resample
to exactly ``target_spacing_mm`` (torchio's grid, :mod:`.fixed_grid`), window, then centre-crop or pad with
``pad_value`` to ``target_shape``. ``axis_order`` says which array axis is which (``SAR``: slices first, as
MedFinder; ``RAS``: nibabel/torchio voxel order). The defaults (``resize``, ``SAR``) are MedFinder's recipe and
are described as recipe version 1, exactly as before these options existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fixed_grid import center_crop_or_pad, resample_exact_spacing
from .geometry import reorient_to_ras, resample_to_spacing
from .loaders import load_volume
from .resample import resize_linear
from .volume import TooFewSlicesError, Volume

if TYPE_CHECKING:  # settings need pydantic only; keep this module importable on its own
    from config.settings import PreprocessingSettings

__all__ = [
    "RECIPE_NAME",
    "RECIPE_VERSION",
    "SUPPORTED_RECIPE_VERSIONS",
    "crop_to_foreground",
    "window_to_range",
    "preprocess_volume",
    "preprocess_path",
    "describe_spec",
]

# Bump when the numbers produced for the same spec change, so bundles can detect a mismatch.
RECIPE_NAME = "medfinder-ct-preprocess"
RECIPE_VERSION = "1"
# Version 2 adds ``fit``, ``pad_value`` and ``axis_order``; a spec using only their defaults is still written as
# version 1 (so older runtimes keep reading MedFinder bundles), any other is version 2 (so they refuse it instead
# of silently ignoring the fields they do not know).
RECIPE_VERSION_FIT = "2"
SUPPORTED_RECIPE_VERSIONS = (RECIPE_VERSION, RECIPE_VERSION_FIT)


def crop_to_foreground(array: np.ndarray, threshold: float) -> np.ndarray:
    """The bounding box of voxels above ``threshold`` (the body and table), or everything if none.

    Cropping air before the resize spends the model's fixed voxel budget on anatomy, and makes the
    result insensitive to how wide the scanner's field of view was.
    """
    mask = array > threshold
    plane_any = mask.any(axis=2)  # one pass over the mask gives the i and j extents
    if not plane_any.any():
        return array
    i = np.flatnonzero(plane_any.any(axis=1))
    j = np.flatnonzero(plane_any.any(axis=0))
    k = np.flatnonzero(mask.any(axis=(0, 1)))
    return array[i[0] : i[-1] + 1, j[0] : j[-1] + 1, k[0] : k[-1] + 1]


def window_to_range(
    array: np.ndarray, hu_window: Sequence[float], output_range: Sequence[float]
) -> np.ndarray:
    """Clip HU to ``hu_window`` and map it linearly onto ``output_range`` (new float32 array).

    NaN (possible in NIfTI) maps to the low end, i.e. is treated as air, instead of spreading
    through the interpolation that follows.
    """
    low, high = float(hu_window[0]), float(hu_window[1])
    out_low, out_high = float(output_range[0]), float(output_range[1])
    scale = (out_high - out_low) / (high - low)
    out = np.multiply(array, np.float32(scale), dtype=np.float32)
    out += np.float32(out_low - low * scale)
    np.fmax(out, np.float32(out_low), out=out)  # fmax/fmin: NaN -> the bound
    np.fmin(out, np.float32(out_high), out=out)
    return out


def preprocess_volume(volume: Volume, spec: PreprocessingSettings) -> np.ndarray:
    """Apply the recipe; returns float32 ``(1, *spec.target_shape)`` with axes (channel, S, A, R), or
    (channel, R, A, S) when ``spec.axis_order`` is ``RAS``.

    Refuses (:class:`TooFewSlicesError`) volumes with fewer than ``spec.min_slices`` voxels along any
    axis before resampling: for axial CT that is the slice count, and it also stops a thin slab of
    sagittal or coronal slices from being stretched into a fake volume.
    """
    ras = reorient_to_ras(volume)
    if min(ras.shape) < spec.min_slices:
        raise TooFewSlicesError(
            f"{volume.source}: volume of shape {ras.shape} (RAS) has fewer than {spec.min_slices} slices along "
            "an axis; a scout/localizer or incomplete series?"
        )
    # MedFinder: resample (optional), linear resize to the target. COLIPRI's ``crop_or_pad``: resample to the exact
    # spacing on torchio's grid, centred crop/pad (no resize). The steps between are the same.
    crop_or_pad = spec.fit == "crop_or_pad"
    if spec.target_spacing_mm is not None:
        ras = (resample_exact_spacing if crop_or_pad else resample_to_spacing)(ras, spec.target_spacing_mm)
    array = ras.array
    if spec.crop_foreground:
        array = crop_to_foreground(array, spec.foreground_threshold_hu)
    windowed = _to_axis_order(window_to_range(array, spec.hu_window, spec.output_range), spec.axis_order)
    if crop_or_pad:
        return center_crop_or_pad(windowed, spec.target_shape, spec.pad_value)[np.newaxis]
    return resize_linear(windowed, spec.target_shape)[np.newaxis]


def _to_axis_order(ras_array: np.ndarray, axis_order: str) -> np.ndarray:
    """A RAS-ordered ``(i, j, k)`` array as the encoder expects it: ``SAR`` (k, j, i) or ``RAS`` unchanged."""
    return ras_array.transpose(2, 1, 0) if axis_order == "SAR" else ras_array


def preprocess_path(source: str | Path | Sequence[str | Path], spec: PreprocessingSettings) -> np.ndarray:
    """``preprocess_volume(load_volume(source), spec)``."""
    return preprocess_volume(load_volume(source), spec)


def describe_spec(spec: PreprocessingSettings) -> dict[str, Any]:
    """A JSON-able record of the recipe, stored in model bundles to check serving matches training."""
    if spec.fit != "resize" or spec.axis_order != "SAR":
        return _describe_fit_spec(spec)
    depth, height, width = (int(n) for n in spec.target_shape)
    return {
        "recipe": RECIPE_NAME,
        "recipe_version": RECIPE_VERSION,
        "orientation": spec.orientation,
        "hu_window": [float(v) for v in spec.hu_window],
        "output_range": [float(v) for v in spec.output_range],
        "target_shape": [depth, height, width],
        "input_shape": [1, depth, height, width],
        "dtype": "float32",
        "target_spacing_mm": None if spec.target_spacing_mm is None else [float(v) for v in spec.target_spacing_mm],
        "crop_foreground": bool(spec.crop_foreground),
        "foreground_threshold_hu": float(spec.foreground_threshold_hu),
        "min_slices": int(spec.min_slices),
        "interpolation": (
            "linear, separable (= trilinear), pixel-centre aligned, edge-clamped; each axis first "
            "block-averaged by floor(shrink factor) when that is >= 2"
        ),
        "steps": [
            "reorient to RAS (axis permutation/flips only)",
            "resample to target_spacing_mm (if set)",
            "crop to bounding box of voxels > foreground_threshold_hu (if crop_foreground; whole volume if none)",
            "clip to hu_window, map linearly to output_range (NaN -> low end)",
            "resize to target_shape",
        ],
        "axes": "array[0, d, h, w] = ras[w, h, d]: d along S (inferior->superior), h along A "
        "(posterior->anterior), w along R (patient left->right); i.e. ras_array.transpose(2, 1, 0)",
        "dicom_assembly": (
            "slices sorted by position along the IOP normal; duplicate positions (<=0.01 mm) keep lowest "
            "InstanceNumber; uneven spacing linearly resampled to the median gap; gantry tilt removed by "
            "in-plane shift onto an untilted grid; HU = stored * RescaleSlope + RescaleIntercept per slice"
        ),
    }


def _describe_fit_spec(spec: PreprocessingSettings) -> dict[str, Any]:
    """Recipe version 2: the spec with its ``fit``, ``pad_value`` and ``axis_order`` (see RECIPE_VERSION_FIT)."""
    shape = [int(n) for n in spec.target_shape]
    crop_or_pad = spec.fit == "crop_or_pad"
    names = "SAR" if spec.axis_order == "SAR" else "RAS"
    return {
        "recipe": RECIPE_NAME,
        "recipe_version": RECIPE_VERSION_FIT,
        "orientation": spec.orientation,
        "hu_window": [float(v) for v in spec.hu_window],
        "output_range": [float(v) for v in spec.output_range],
        "target_shape": shape,
        "input_shape": [1, *shape],
        "dtype": "float32",
        "target_spacing_mm": None if spec.target_spacing_mm is None else [float(v) for v in spec.target_spacing_mm],
        "crop_foreground": bool(spec.crop_foreground),
        "foreground_threshold_hu": float(spec.foreground_threshold_hu),
        "min_slices": int(spec.min_slices),
        "fit": spec.fit,
        "pad_value": float(spec.pad_value),
        "axis_order": spec.axis_order,
        "interpolation": (
            "linear, edge-clamped, no anti-aliasing; exact target spacing, floor(n * spacing / target) voxels, "
            "grid centred on the original (torchio Resample)" if crop_or_pad else
            "linear, separable (= trilinear), pixel-centre aligned, edge-clamped; each axis first "
            "block-averaged by floor(shrink factor) when that is >= 2"
        ),
        "steps": [
            "reorient to RAS (axis permutation/flips only)",
            "resample to exactly target_spacing_mm (if set)" if crop_or_pad
            else "resample to target_spacing_mm (if set)",
            "crop to bounding box of voxels > foreground_threshold_hu (if crop_foreground; whole volume if none)",
            "clip to hu_window, map linearly to output_range (NaN -> low end)",
            f"axes to {names} order",
            "centre crop or pad with pad_value to target_shape (ceil(d/2) voxels at the start, floor(d/2) at the end)"
            if crop_or_pad else "resize to target_shape",
        ],
        "axes": ("array[0, d, h, w] = ras[w, h, d] (S, A, R); i.e. ras_array.transpose(2, 1, 0)" if names == "SAR"
                 else "array[0, i, j, k] = ras[i, j, k]: i along R, j along A, k along S (nibabel/torchio order)"),
        "dicom_assembly": (
            "slices sorted by position along the IOP normal; duplicate positions (<=0.01 mm) keep lowest "
            "InstanceNumber; uneven spacing linearly resampled to the median gap; gantry tilt removed by "
            "in-plane shift onto an untilted grid; HU = stored * RescaleSlope + RescaleIntercept per slice"
        ),
    }
