"""NIfTI and ``.npy`` volumes (the training-side formats) as :class:`Volume` objects."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .volume import DimensionalityError, Volume, VolumeError

__all__ = ["load_nifti", "load_npy", "squeeze_to_3d"]


def squeeze_to_3d(array: np.ndarray, source: str) -> np.ndarray:
    """Drop trailing singleton axes beyond the third (a 4D series of one time point is a 3D volume)."""
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DimensionalityError(f"{source}: expected a 3D volume, got shape {shape}")
    return array


def load_nifti(path: str | Path) -> Volume:
    """Load a 3D ``.nii``/``.nii.gz`` in its stored orientation, scaled by scl_slope/inter, as float32.

    The affine is nibabel's best affine (sform when set, else qform), already RAS+.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: NIfTI file does not exist")
    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib errors...
        raise VolumeError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
    array = squeeze_to_3d(array, str(path))
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(f"{path}: voxel type {array.dtype} is not a real scalar")
    return Volume(
        array=array.astype(np.float32, copy=False),
        affine=np.asarray(image.affine, dtype=np.float64),
        source=str(path),
        meta={"format": "nifti"},
    )


def load_npy(path: str | Path) -> Volume:
    """Load a 3D ``.npy`` array with an identity affine (1 mm voxels; for tests and synthetic data)."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: .npy file does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read as .npy ({type(exc).__name__}: {exc})") from exc
    array = squeeze_to_3d(np.asarray(array), str(path))
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VolumeError(f"{path}: array type {array.dtype} is not a real scalar")
    return Volume(
        array=array.astype(np.float32, copy=False), affine=np.eye(4), source=str(path), meta={"format": "npy"}
    )
