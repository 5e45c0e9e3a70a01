"""Torch-free CT volume loading and the one preprocessing recipe shared by training and serving.

Public API: :class:`Volume`, :class:`VolumeError` (and subclasses), :func:`load_dicom_series`,
:func:`read_dicom_slice`, :func:`load_multiframe_series` (Enhanced CT via highdicom), :func:`load_nifti`,
:func:`load_volume`, :func:`reorient_to_ras`,
:func:`resample_to_spacing`, :func:`preprocess_volume`, :func:`preprocess_path`, :func:`describe_spec`.
"""

from .dicom_multiframe import load_multiframe_series
from .dicom_series import load_dicom_series
from .dicom_slice import DicomSlice, read_dicom_slice
from .geometry import axis_codes, reorient_to_ras, resample_to_spacing
from .loaders import load_volume
from .nifti import load_nifti, load_npy
from .fixed_grid import center_crop_or_pad, resample_exact_spacing
from .pipeline import (
    RECIPE_NAME,
    RECIPE_VERSION,
    SUPPORTED_RECIPE_VERSIONS,
    crop_to_foreground,
    describe_spec,
    preprocess_path,
    preprocess_volume,
    window_to_range,
)
from .resample import resize_linear
from .volume import (
    DimensionalityError,
    MixedSeriesError,
    MultiFrameImageError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    TooFewSlicesError,
    Volume,
    VolumeError,
)

__all__ = [
    "RECIPE_NAME",
    "RECIPE_VERSION",
    "SUPPORTED_RECIPE_VERSIONS",
    "DicomSlice",
    "DimensionalityError",
    "MixedSeriesError",
    "MultiFrameImageError",
    "NoPixelDataError",
    "NotDicomError",
    "PixelDecodeError",
    "TooFewSlicesError",
    "Volume",
    "VolumeError",
    "axis_codes",
    "center_crop_or_pad",
    "crop_to_foreground",
    "describe_spec",
    "load_dicom_series",
    "load_multiframe_series",
    "load_nifti",
    "load_npy",
    "load_volume",
    "preprocess_path",
    "preprocess_volume",
    "read_dicom_slice",
    "reorient_to_ras",
    "resample_exact_spacing",
    "resample_to_spacing",
    "resize_linear",
    "window_to_range",
]
