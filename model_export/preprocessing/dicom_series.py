"""Load ONE DICOM series (a folder or a list of files) into a :class:`Volume`.

Policy, chosen for a PACS-side service that must be robust but never silently wrong:

* Order comes from geometry only: position along the slice normal (``IOP row x col · IPP``), never
  InstanceNumber or file names (both are unreliable across vendors and anonymisers).
* One series only: files must agree on SeriesInstanceUID, FrameOfReferenceUID, orientation, matrix size
  and pixel spacing, else :class:`MixedSeriesError` lists what differs. Blank UIDs (heavily anonymised
  exports) are accepted as "unknown": the geometry checks still apply, and the volume's
  ``meta['series_instance_uid']`` is ``None``; a mix of blank and non-blank UIDs is rejected as mixed.
* Duplicate positions (within 0.01 mm): one slice is kept, the one with the lowest
  (InstanceNumber, SOPInstanceUID, file name) so the choice does not depend on file order, and a warning
  is logged; ``meta['duplicates_dropped']`` counts them.
* In a folder, non-DICOM files (README, thumbnails) and DICOM objects without pixels (DICOMDIR, SR)
  are skipped with a log line; in an explicit file list every file must be a DICOM image.
* Non-CT modalities are allowed and recorded in ``meta['modality']`` (with a warning).
* Uneven spacing and gantry tilt are regularised by :mod:`.slice_assembly` (see there).
* Multi-frame objects (Enhanced CT) are one series of frames: a series of them goes to
  :mod:`.dicom_multiframe` (highdicom), frames counting as slices; single- and multi-frame images mixed in one
  series are refused as mixed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dicom_multiframe import load_multiframe_series
from .dicom_slice import DicomSlice, read_dicom_slice
from .slice_assembly import assemble_stack
from .volume import (
    MixedSeriesError,
    MultiFrameImageError,
    NoPixelDataError,
    NotDicomError,
    TooFewSlicesError,
    Volume,
    VolumeError,
)

__all__ = ["load_dicom_series", "DUPLICATE_TOLERANCE_MM"]

log = logging.getLogger(__name__)

DUPLICATE_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-4
_SPACING_TOLERANCE_MM = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_images(paths: Sequence[Path], *, skip_non_images: bool) -> tuple[list[DicomSlice], list[Path], list[str]]:
    """Single-frame slices, multi-frame files (loaded later by highdicom) and, in a folder, skipped file names."""
    slices: list[DicomSlice] = []
    multiframe: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        try:
            slices.append(read_dicom_slice(path))
        except MultiFrameImageError:
            multiframe.append(path)
        except (NotDicomError, NoPixelDataError) as exc:
            if not skip_non_images:
                raise
            skipped.append(path.name)
            log.debug("skipping %s", exc)
    return slices, multiframe, skipped


def _collect_folder(folder: Path) -> tuple[list[DicomSlice], list[Path], list[str]]:
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return _read_images(paths, skip_non_images=True)


def _describe_mismatch(label: str, values: list[str], slices: list[DicomSlice]) -> str:
    counts = Counter(values)
    examples = {value: next(s.path.name for s, v in zip(slices, values) if v == value) for value in counts}
    parts = [f"{value or '<blank>'}: {count} file(s), e.g. {examples[value]}" for value, count in counts.most_common()]
    return f"files belong to different {label}s - " + "; ".join(parts)


def _check_one_series(slices: list[DicomSlice], source: str) -> None:
    """Raise MixedSeriesError if the slices cannot be one volume."""

    def require_same(label: str, values: list[str]) -> None:
        if len(set(values)) > 1:
            raise MixedSeriesError(f"{source}: {_describe_mismatch(label, values, slices)}")

    require_same("SeriesInstanceUID", [s.series_uid for s in slices])
    frames = [s.frame_of_reference_uid for s in slices]
    if all(frames):
        require_same("FrameOfReferenceUID", frames)
    require_same("matrix size", [f"{s.rows}x{s.columns}" for s in slices])
    first = slices[0]
    for s in slices[1:]:
        if not (
            np.allclose(s.row_direction, first.row_direction, atol=_ORIENTATION_TOLERANCE)
            and np.allclose(s.column_direction, first.column_direction, atol=_ORIENTATION_TOLERANCE)
        ):
            raise MixedSeriesError(
                f"{source}: image orientations differ ({first.path.name}: "
                f"{np.round(np.r_[first.row_direction, first.column_direction], 4).tolist()} vs {s.path.name}: "
                f"{np.round(np.r_[s.row_direction, s.column_direction], 4).tolist()}); not one volume"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=_SPACING_TOLERANCE_MM):
            raise MixedSeriesError(
                f"{source}: pixel spacings differ ({first.path.name}: {first.pixel_spacing} vs "
                f"{s.path.name}: {s.pixel_spacing}); not one volume"
            )


def _sort_and_deduplicate(slices: list[DicomSlice], source: str) -> tuple[list[DicomSlice], int]:
    normal = slices[0].normal
    positions = np.array([s.position @ normal for s in slices])
    # Stable, file-order-independent order: geometry first, then identity for exact ties.
    def tie_key(i: int) -> tuple[float, int, str, str]:
        s = slices[i]
        return (positions[i], s.instance_number if s.instance_number is not None else 2**62, s.sop_uid, s.path.name)

    order = sorted(range(len(slices)), key=tie_key)
    groups: list[list[int]] = []
    for i in order:
        if groups and positions[i] - positions[groups[-1][0]] <= DUPLICATE_TOLERANCE_MM:
            groups[-1].append(i)
        else:
            groups.append([i])
    kept = [min(group, key=lambda i: tie_key(i)[1:]) for group in groups]
    dropped = len(slices) - len(kept)
    if dropped:
        names = [slices[i].path.name for group in groups if len(group) > 1 for i in group]
        log.warning(
            "%s: %d slice(s) share a position with another slice and were dropped (kept the lowest "
            "InstanceNumber of each group): %s",
            source,
            dropped,
            ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""),
        )
    return [slices[i] for i in kept], dropped


def load_dicom_series(source: str | Path | Sequence[str | Path], *, min_slices: int = 1) -> Volume:
    """Load one series from a folder, a single file, or a list of files (see module doc for policy).

    ``min_slices`` (after removing duplicates) lets callers refuse scouts early; the preprocessing
    recipe applies its own ``min_slices`` later, so the default accepts even a single slice.
    """
    skipped: list[str] = []
    multiframe: list[Path] = []
    if isinstance(source, (str, Path)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise VolumeError(f"{path}: path does not exist")
        if path.is_dir():
            slices, multiframe, skipped = _collect_folder(path)
            if not slices and not multiframe:
                subfolders = sum(1 for p in path.iterdir() if p.is_dir())
                detail = [f"skipped {len(skipped)} non-image file(s), e.g. {skipped[0]}"] if skipped else []
                if subfolders:
                    detail.append(f"it has {subfolders} subfolder(s): pass one series folder")
                raise VolumeError(
                    f"{path}: folder contains no DICOM image files ({'; '.join(detail) or 'it is empty'})"
                )
        else:
            slices, multiframe, _ = _read_images([path], skip_non_images=False)
    else:
        paths = list(dict.fromkeys(Path(p).resolve() for p in source))  # the same file twice is one file
        if not paths:
            raise VolumeError("empty list of DICOM files")
        label = str(paths[0].parent) if len(paths) > 1 else str(paths[0])
        label = f"{label} ({len(paths)} files)"
        slices, multiframe, _ = _read_images(paths, skip_non_images=False)

    if multiframe:
        if slices:
            raise MixedSeriesError(f"{label}: {len(slices)} single-frame and {len(multiframe)} multi-frame image(s) "
                                   f"(e.g. {multiframe[0].name}); not one volume")
        return load_multiframe_series(multiframe, label=label, min_slices=min_slices, files_skipped=len(skipped))
    _check_one_series(slices, label)
    kept, dropped = _sort_and_deduplicate(slices, label)
    if len(kept) < min_slices:
        raise TooFewSlicesError(
            f"{label}: only {len(kept)} distinct slice position(s) (need >= {min_slices}); a scout or partial series?"
        )

    first = kept[0]
    stack = np.empty((len(kept), first.rows, first.columns), dtype=np.float32)
    for k, s in enumerate(kept):
        stack[k] = s.hu()
    assembled = assemble_stack(
        stack,
        np.array([s.position for s in kept]),
        first.row_direction,
        first.column_direction,
        first.pixel_spacing,
        single_slice_gap_mm=first.spacing_between_slices or first.slice_thickness or 1.0,
        source=label,
    )

    modality = first.modality or None
    if modality != "CT":
        log.warning(
            "%s: modality is %s, not CT; Hounsfield windows may not be meaningful", label, modality or "missing"
        )
    series_uid = first.series_uid or None
    if series_uid is None:
        log.warning(
            "%s: SeriesInstanceUID is blank; cannot prove the files are one series (geometry checks passed)", label
        )
    meta = {
        "format": "dicom",
        "modality": modality,
        "series_instance_uid": series_uid,
        "transfer_syntaxes": sorted({s.transfer_syntax_uid for s in kept}),
        "n_files": len(slices),
        "n_slices": len(kept),
        "duplicates_dropped": dropped,
        "files_skipped": len(skipped),
        **assembled.info,
    }
    # The stack is [slice, row, column]; nibabel order (column, row, slice) is its transpose (a view).
    return Volume(
        array=assembled.stack.transpose(2, 1, 0),
        affine=_LPS_TO_RAS @ assembled.affine_lps,
        source=label,
        meta=meta,
    )
