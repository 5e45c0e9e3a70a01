"""``load_volume``: one entry point that picks the reader from what the path is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .dicom_series import load_dicom_series
from .nifti import load_nifti, load_npy
from .volume import Volume, VolumeError

__all__ = ["load_volume"]


def load_volume(source: str | Path | Sequence[str | Path]) -> Volume:
    """Directory or list of files -> DICOM series; ``.dcm`` file -> one-slice DICOM; ``.nii``/``.nii.gz``
    -> NIfTI; ``.npy`` -> array with identity affine. Anything else raises :class:`VolumeError`.
    """
    if not isinstance(source, (str, Path)):
        return load_dicom_series(source)
    path = Path(source)
    if not path.exists():
        raise VolumeError(f"{path}: path does not exist")
    if path.is_dir():
        return load_dicom_series(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return load_nifti(path)
    if name.endswith(".npy"):
        return load_npy(path)
    if name.endswith(".dcm"):
        return load_dicom_series(path)
    raise VolumeError(
        f"{path}: unsupported volume file type; expected a DICOM series folder, a .dcm file, .nii/.nii.gz or .npy"
    )
