"""One DICOM image file: the header facts needed to place it in a volume, and its decoded HU pixels.

Headers are parsed eagerly and pixels decoded on demand, so a series can be checked for consistency
(one series, one orientation, one size) before any time is spent decompressing JPEG 2000 frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from .volume import (
    MultiFrameImageError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    VolumeError,
)

__all__ = ["DicomSlice", "read_dicom_slice"]

# Hint for the usual reason a JPEG-LS / JPEG lossless file fails: no decoder plugin installed.
_DECODER_HINT = (
    "install a licence-clean decoder plugin for it (pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls or python-gdcm) "
    "or have the PACS send an uncompressed, JPEG 2000 or RLE transfer syntax"
)


@dataclass(frozen=True)
class DicomSlice:
    """Geometry and identity of one single-frame DICOM image (LPS patient coordinates, mm)."""

    path: Path
    rows: int
    columns: int
    row_direction: np.ndarray  # unit vector along which the column index increases (IOP[0:3])
    column_direction: np.ndarray  # unit vector along which the row index increases (IOP[3:6])
    position: np.ndarray  # ImagePositionPatient: centre of the first transmitted pixel
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as in PixelSpacing
    series_uid: str
    frame_of_reference_uid: str
    sop_uid: str
    instance_number: int | None
    modality: str
    transfer_syntax_uid: str
    slope: float
    intercept: float
    slice_thickness: float | None
    spacing_between_slices: float | None
    dataset: Dataset = field(repr=False, compare=False)

    @property
    def normal(self) -> np.ndarray:
        """Slice normal (row direction x column direction): the axis slices are sorted along."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def transfer_syntax_name(self) -> str:
        """Human-readable transfer syntax, for error messages."""
        uid = UID(self.transfer_syntax_uid)
        return f"{uid.name} ({uid})" if uid.is_valid and uid.name != uid else uid or "unknown"

    def hu(self) -> np.ndarray:
        """Decode the pixels and apply this slice's RescaleSlope/Intercept: float32 ``[rows, columns]``.

        Any decoder failure becomes a :class:`PixelDecodeError` naming the transfer syntax, because
        "which codec is missing" is the only actionable fact for whoever runs the node.
        """
        try:
            raw = self.dataset.pixel_array
        except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by codec
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = (lines[0] + " " + "; ".join(lines[1:])).strip() if lines else type(exc).__name__
            raise PixelDecodeError(
                f"{self.path}: cannot decode pixel data in transfer syntax {self.transfer_syntax_name}: "
                f"{reason}; {_DECODER_HINT}"
            ) from exc
        if raw.shape != (self.rows, self.columns):
            raise VolumeError(
                f"{self.path}: decoded pixel array has shape {raw.shape}, expected ({self.rows}, {self.columns})"
            )
        pixels = raw.astype(np.float32)
        if self.slope != 1.0:
            pixels *= np.float32(self.slope)
        if self.intercept != 0.0:
            pixels += np.float32(self.intercept)
        return pixels


def _floats(ds: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        numbers = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: {keyword} is not numeric: {value!r}") from exc
    if numbers is None or numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise VolumeError(
            f"{path}: missing or malformed {keyword} ({value!r}); cannot place the slice in space"
        )
    return numbers


def _optional_float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _read_dataset(path: Path) -> Dataset:
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    if not path.is_file():
        raise VolumeError(f"{path}: not a regular file")
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise NotDicomError(f"{path}: not a DICOM file (no 'DICM' Part 10 header): {exc}") from exc
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read file: {exc}") from exc
    except Exception as exc:  # truncated or corrupt files raise assorted errors inside pydicom
        raise NotDicomError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc


def read_dicom_slice(path: str | Path) -> DicomSlice:
    """Read one single-frame DICOM image's header (pixels are decoded later by :meth:`DicomSlice.hu`).

    Raises :class:`VolumeError` subclasses for missing/unreadable/non-DICOM files, files without pixel
    data, multi-frame (:class:`MultiFrameImageError`) or colour images, and missing geometry (position,
    orientation, pixel spacing).
    """
    path = Path(path)
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        what = _text(ds, "SOPClassUID") or _text(ds.get("file_meta", Dataset()), "MediaStorageSOPClassUID")
        raise NoPixelDataError(f"{path}: DICOM file has no pixel data (SOP class {what or 'unknown'})")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames != 1:
        raise MultiFrameImageError(f"{path}: multi-frame image ({frames} frames), not a single slice")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise VolumeError(f"{path}: colour image (SamplesPerPixel={ds.SamplesPerPixel}); expected greyscale CT")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: missing Rows/Columns") from exc

    orientation = _floats(ds, "ImageOrientationPatient", 6, path)
    row_dir, col_dir = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if min(norms) < 1e-6 or abs(float(row_dir @ col_dir)) > 1e-3 * norms[0] * norms[1]:
        raise VolumeError(f"{path}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal vectors")
    spacing = _floats(ds, "PixelSpacing", 2, path)
    if not np.all(spacing > 0):
        raise VolumeError(f"{path}: PixelSpacing must be positive, got {spacing.tolist()}")

    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: RescaleSlope/RescaleIntercept are not numeric") from exc
    try:
        instance: int | None = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        instance = None
    file_meta: Any = getattr(ds, "file_meta", Dataset())
    return DicomSlice(
        path=path,
        rows=rows,
        columns=columns,
        row_direction=row_dir / norms[0],
        column_direction=col_dir / norms[1],
        position=_floats(ds, "ImagePositionPatient", 3, path),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        series_uid=_text(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        sop_uid=_text(ds, "SOPInstanceUID") or _text(file_meta, "MediaStorageSOPInstanceUID"),
        instance_number=instance,
        modality=_text(ds, "Modality"),
        transfer_syntax_uid=_text(file_meta, "TransferSyntaxUID"),
        slope=slope,
        intercept=intercept,
        slice_thickness=_optional_float(ds, "SliceThickness"),
        spacing_between_slices=_optional_float(ds, "SpacingBetweenSlices"),
        dataset=ds,
    )
