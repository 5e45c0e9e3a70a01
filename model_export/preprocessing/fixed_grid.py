"""Resampling to an exact spacing and centred crop/pad: the grid of torchio's ``Resample`` + ``CropOrPad``.

Used by the ``crop_or_pad`` fit (COLIPRI's recipe). There, voxels keep a fixed physical size, so the spacing must
be exactly the target (MedFinder's :func:`~model_export.preprocessing.geometry.resample_to_spacing` instead keeps
the field of view and lets the spacing drift by up to half a voxel, which is right for its final resize).

Conventions, as in torchio 1.2 (``Resample.get_reference_image`` and ``CropOrPad``), checked against it in
tests/test_colipri.py:

* new voxel count per axis ``floor(n * spacing / target)`` (never extrapolates), grid centred on the old one:
  new voxel ``t`` sits at old continuous index ``(n - 1) / 2 + (t - (m - 1) / 2) * target / spacing``;
* linear interpolation, edge-clamped (what ITK's linear interpolator does within half a voxel of the border),
  no anti-aliasing (COLIPRI's ``antialias: false``);
* crop or pad each axis by ``d``: ``ceil(d / 2)`` voxels at the start, ``floor(d / 2)`` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .volume import Volume, VolumeError

__all__ = ["center_crop_or_pad", "resample_exact_spacing"]


def _interpolate_axis(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Edge-clamped linear interpolation of ``array`` along ``axis`` at continuous indices ``positions``."""
    size = array.shape[axis]
    low = np.clip(np.floor(positions), 0, size - 1).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    weight = np.clip(positions - low, 0.0, 1.0).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    first = np.take(array, low, axis=axis)
    second = np.take(array, high, axis=axis)
    return (first + (second - first) * weight).astype(np.float32, copy=False)


def resample_exact_spacing(volume: Volume, spacing_mm: Sequence[float]) -> Volume:
    """Resample to exactly ``spacing_mm`` per voxel axis (i, j, k), centred, ``floor`` voxel counts."""
    target = np.asarray(spacing_mm, dtype=np.float64)
    if target.shape != (3,) or not np.all(target > 0):
        raise VolumeError(f"{volume.source}: target spacing must be three positive numbers, got {spacing_mm!r}")
    old_shape = np.asarray(volume.shape)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    new_shape = np.floor(old_shape * spacing / target).astype(int)
    new_shape[old_shape == 1] = 1
    if np.any(new_shape < 1):
        raise VolumeError(f"{volume.source}: volume {tuple(old_shape)} at {tuple(spacing)} mm is smaller than one "
                          f"{tuple(target)} mm voxel")
    scale = target / spacing
    if tuple(new_shape) == volume.shape and np.allclose(scale, 1.0):
        return volume
    array = volume.array
    for axis in range(3):
        positions = (old_shape[axis] - 1) / 2 + (np.arange(new_shape[axis]) - (new_shape[axis] - 1) / 2) * scale[axis]
        array = _interpolate_axis(array, axis, positions)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (old_shape - 1) / 2 - (new_shape - 1) / 2 * scale
    return Volume(array=array, affine=volume.affine @ step, source=volume.source, meta=dict(volume.meta))


def center_crop_or_pad(array: np.ndarray, target_shape: Sequence[int], pad_value: float) -> np.ndarray:
    """Crop or pad every axis to ``target_shape`` around the centre (torchio's ``CropOrPad``, constant padding)."""
    target = [int(n) for n in target_shape]
    if len(target) != array.ndim:
        raise ValueError(f"target shape {target} does not match an array of {array.ndim} dimensions")
    slices, padding = [], []
    for size, wanted in zip(array.shape, target):
        excess = size - wanted
        if excess > 0:  # crop: ceil(excess / 2) from the start
            start = (excess + 1) // 2
            slices.append(slice(start, start + wanted))
            padding.append((0, 0))
        else:
            slices.append(slice(None))
            missing = -excess
            padding.append(((missing + 1) // 2, missing // 2))
    cropped = array[tuple(slices)]
    if any(before or after for before, after in padding):
        cropped = np.pad(cropped, padding, mode="constant", constant_values=np.float32(pad_value))
    return np.ascontiguousarray(cropped, dtype=np.float32)
