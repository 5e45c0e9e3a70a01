"""Voxel-grid geometry: reorientation to RAS and resampling to a target spacing, affine kept in step.

Reorientation is only axis permutation and flips (no interpolation), so it is exact and cheap; an
oblique acquisition stays oblique in its affine, with voxel axes mapped to the nearest of R, A, S.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations

from .resample import resize_linear
from .volume import Volume, VolumeError

__all__ = ["reorient_to_ras", "resample_to_spacing", "axis_codes"]


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """The anatomical direction each voxel axis points to, e.g. ``('L', 'P', 'S')`` for raw DICOM."""
    return tuple(orientations.aff2axcodes(affine))  # type: ignore[return-value]


def reorient_to_ras(volume: Volume) -> Volume:
    """Permute/flip the voxel axes so that i, j, k increase towards Right, Anterior, Superior.

    The same anatomy then lands on the same array axes whatever the scanner or file format stored,
    which is what lets training (NIfTI) and serving (DICOM) share one model. The returned array may be
    a view of the input's (no copy); the input is returned unchanged when it is already RAS.
    """
    ornt = orientations.io_orientation(volume.affine)
    if np.isnan(ornt).any():
        raise VolumeError(f"{volume.source}: cannot determine the orientation of affine {volume.affine!r}")
    if np.array_equal(ornt, orientations.axcodes2ornt(("R", "A", "S"))):
        return volume
    array = orientations.apply_orientation(volume.array, ornt)
    affine = volume.affine @ orientations.inv_ornt_aff(ornt, volume.array.shape)
    return Volume(array=array, affine=affine, source=volume.source, meta=dict(volume.meta))


def resample_to_spacing(volume: Volume, spacing_mm: Sequence[float]) -> Volume:
    """Linearly resample to roughly ``spacing_mm`` (per voxel axis i, j, k), keeping the field of view.

    Voxel counts are rounded, so the achieved spacing is ``extent / count`` (within half a voxel of
    the request over the whole extent); the affine records the exact value used.
    """
    target = np.asarray(spacing_mm, dtype=np.float64)
    if target.shape != (3,) or not np.all(target > 0):
        raise VolumeError(f"{volume.source}: target spacing must be three positive numbers, got {spacing_mm!r}")
    old_shape = np.asarray(volume.shape, dtype=np.float64)
    new_shape = np.maximum(1, np.rint(old_shape * np.asarray(volume.spacing) / target)).astype(int)
    if tuple(new_shape) == volume.shape:
        return volume
    array = resize_linear(volume.array, tuple(new_shape))
    scale = old_shape / new_shape
    # New voxel t is centred at old coordinate t*scale + (scale-1)/2 (pixel-centre convention).
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1.0) / 2.0
    return Volume(array=array, affine=volume.affine @ step, source=volume.source, meta=dict(volume.meta))
