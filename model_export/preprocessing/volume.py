"""The in-memory CT volume every loader returns, and the one error type every bad input raises.

A single error family (``VolumeError``, a ``ValueError``) lets the DICOM node, workers and the trainer
catch "this input is unusable" in one place and report the message, instead of leaking pydicom/nibabel
exception types whose names change between versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Volume",
    "VolumeError",
    "NotDicomError",
    "NoPixelDataError",
    "PixelDecodeError",
    "MixedSeriesError",
    "TooFewSlicesError",
    "DimensionalityError",
    "MultiFrameImageError",
]


class VolumeError(ValueError):
    """An input that cannot become a CT volume; the message names the file/folder and the reason."""


class NotDicomError(VolumeError):
    """A file that pydicom cannot parse as a DICOM Part 10 file."""


class NoPixelDataError(VolumeError):
    """A DICOM file without an image (structured report, presentation state, DICOMDIR...)."""


class PixelDecodeError(VolumeError):
    """Pixel data that no installed pydicom handler can decode (the message names the transfer syntax)."""


class MixedSeriesError(VolumeError):
    """Files that do not form one series (different UIDs, orientations, sizes or pixel spacings)."""


class TooFewSlicesError(VolumeError):
    """Too few slices to be a diagnostic volume (a scout/localizer or a partial transfer)."""


class MultiFrameImageError(VolumeError):
    """A multi-frame image where one slice was expected; :func:`load_dicom_series` routes such files to the
    multi-frame loader (``dicom_multiframe``) instead of failing."""


class DimensionalityError(VolumeError):
    """An array or image that is not three-dimensional."""


@dataclass
class Volume:
    """A 3D scalar volume in Hounsfield units with its nibabel-style geometry.

    ``array`` axes are nibabel voxel order ``(i, j, k)`` (for DICOM: columns, rows, slices) and
    ``affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres, so one object means the same thing whether it
    came from DICOM, NIfTI or a test array. ``meta`` carries JSON-able facts about how the volume was
    assembled (modality, duplicates dropped, tilt corrected...), for logs and audit, never for maths.
    The array may be a view (e.g. after :func:`reorient_to_ras`); treat it as read-only.
    """

    array: np.ndarray
    affine: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate here so that every later step can rely on a 3D float32 array and an invertible affine.
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise DimensionalityError(f"{self.source}: expected a 3D volume, got shape {array.shape}")
        if min(array.shape) < 1:
            raise DimensionalityError(f"{self.source}: empty volume, shape {array.shape}")
        self.array = array.astype(np.float32, copy=False)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError(f"{self.source}: affine must be a finite 4x4 matrix, got {affine!r}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise VolumeError(f"{self.source}: affine is singular (zero voxel size or collinear axes)")
        self.affine = affine
        self.source = str(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts along ``(i, j, k)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres per voxel along ``(i, j, k)`` (column norms of the affine)."""
        norms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in norms)  # type: ignore[return-value]
