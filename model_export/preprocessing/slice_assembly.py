"""Turn positioned 2D slices into a regular, orthogonal 3D grid (uneven spacing and gantry tilt).

Everything downstream (cropping, resizing, the model) treats voxels as a regular orthogonal grid, so
irregular acquisitions are fixed here, once, with explicit and documented choices:

* Slice axis: slices are ordered by their position along the orientation normal ``n = row x col``.
* Uneven spacing: when the gaps along ``n`` differ by more than 1 % (or 1 µm), the stack is linearly
  interpolated onto a uniform grid. Spacing = the **median** gap, adjusted so that the first and last
  planes coincide with the first and last real slices (``extent / round(extent / median)``). Median,
  not the smallest gap, because one close pair (a re-scan, a rounding glitch) must not multiply the
  plane count; regions sampled more finely than the median are smoothed, regions more coarsely are
  interpolated, and the physical extent is exact.
* Gantry tilt: when successive positions drift within the slice plane (the step is not along ``n``),
  each slice is shifted in-plane (bilinear, sub-pixel) onto a common grid so the output is an
  **untilted**, orthogonal volume whose affine is exact. The in-plane grid is enlarged to cover every
  slice's footprint (no anatomy is cut off); uncovered voxels get the stack's minimum value (air /
  outside-FOV padding). The alternative, a sheared affine, would be silently ignored by every
  voxel-space operation downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .resample import interpolate_along_axis
from .volume import VolumeError

__all__ = ["AssembledStack", "assemble_stack", "MAX_RESAMPLED_SLICES"]

log = logging.getLogger(__name__)

# Refuse to invent more planes than this when regularising spacing (guards against absurd gap patterns).
MAX_RESAMPLED_SLICES = 2048
# In-plane drift below this fraction of a pixel is position jitter, not tilt.
TILT_TOLERANCE_PIXELS = 0.05
# Gaps within max(1 % of the median, 1 µm) of the median count as uniform.
UNIFORM_RELATIVE_TOLERANCE = 0.01
UNIFORM_ABSOLUTE_TOLERANCE_MM = 1e-3


@dataclass
class AssembledStack:
    """A regular stack ``[slices, rows, columns]`` and its LPS affine (voxel (col, row, slice) -> mm)."""

    stack: np.ndarray
    affine_lps: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _tilt_correct(
    stack: np.ndarray, row_offsets: np.ndarray, col_offsets: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """Shift each slice by its in-plane drift (in pixels) onto one enlarged canvas; return canvas origin."""
    row_min = int(np.floor(row_offsets.min()))
    col_min = int(np.floor(col_offsets.min()))
    n, rows, cols = stack.shape
    out_rows = int(np.ceil(row_offsets.max())) - row_min + rows
    out_cols = int(np.ceil(col_offsets.max())) - col_min + cols
    fill = float(stack.min())
    canvas = np.empty((n, out_rows, out_cols), dtype=np.float32)
    for k in range(n):
        # canvas pixel (r, c) shows slice pixel (r + row_min - row_offset_k, c + col_min - col_offset_k)
        ndimage.affine_transform(
            stack[k],
            np.ones(2),
            offset=(row_min - row_offsets[k], col_min - col_offsets[k]),
            output_shape=(out_rows, out_cols),
            output=canvas[k],
            order=1,
            mode="constant",
            cval=fill,
        )
    return canvas, row_min, col_min


def assemble_stack(
    stack: np.ndarray,
    positions: np.ndarray,
    row_direction: np.ndarray,
    column_direction: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    single_slice_gap_mm: float = 1.0,
    source: str = "<slices>",
) -> AssembledStack:
    """Regularise slices already sorted by position along the normal and free of duplicates.

    ``stack`` is ``[n, rows, columns]`` float32, ``positions`` the ``[n, 3]`` ImagePositionPatient values
    (LPS mm). ``single_slice_gap_mm`` is the slice spacing recorded for a one-slice stack.
    """
    u = np.asarray(row_direction, dtype=np.float64)
    v = np.asarray(column_direction, dtype=np.float64)
    normal = np.cross(u, v)
    row_spacing, col_spacing = pixel_spacing
    n = stack.shape[0]
    rel = positions - positions[0]
    along = rel @ normal
    info: dict[str, Any] = {"gantry_tilt_corrected": False, "slice_resampled": False, "gantry_tilt_deg": 0.0}

    origin = positions[0].copy()
    if n > 1:
        col_offsets = (rel @ u) / col_spacing  # in pixels
        row_offsets = (rel @ v) / row_spacing
        drift = max(np.abs(col_offsets).max(), np.abs(row_offsets).max())
        if drift > TILT_TOLERANCE_PIXELS:
            step = rel[-1]
            tilt = float(np.degrees(np.arccos(min(1.0, abs(step @ normal) / np.linalg.norm(step)))))
            log.info("%s: gantry tilt %.2f deg (in-plane drift %.1f px); resampling to an untilted grid",
                     source, tilt, drift)
            stack, row_min, col_min = _tilt_correct(stack, row_offsets, col_offsets)
            origin = origin + row_min * row_spacing * v + col_min * col_spacing * u
            info.update(gantry_tilt_corrected=True, gantry_tilt_deg=round(tilt, 3))

        gaps = np.diff(along)
        median = float(np.median(gaps))
        extent = float(along[-1] - along[0])
        tolerance = max(UNIFORM_RELATIVE_TOLERANCE * median, UNIFORM_ABSOLUTE_TOLERANCE_MM)
        info["slice_gap_mm"] = {"min": float(gaps.min()), "median": median, "max": float(gaps.max())}
        if np.abs(gaps - median).max() <= tolerance:
            gap = extent / (n - 1)
        else:
            planes = int(round(extent / median)) + 1
            if planes > MAX_RESAMPLED_SLICES:
                raise VolumeError(
                    f"{source}: slice positions span {extent:.1f} mm with a median gap of {median:.3f} mm; "
                    f"refusing to build {planes} planes (is this really one series?)"
                )
            gap = extent / (planes - 1)
            targets = along[0] + gap * np.arange(planes)
            index = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, n - 2)
            coords = index + (targets - along[index]) / (along[index + 1] - along[index])
            stack = interpolate_along_axis(stack, 0, coords)
            if gaps.max() > 3 * median:
                log.warning("%s: a slice gap of %.2f mm is over 3x the median %.2f mm (missing slices?); "
                            "it is filled by linear interpolation", source, gaps.max(), median)
            log.info("%s: uneven slice spacing (%.3f..%.3f mm); resampled %d slices onto %d planes every %.3f mm",
                     source, gaps.min(), gaps.max(), n, planes, gap)
            info.update(slice_resampled=True)
    else:
        gap = single_slice_gap_mm

    affine = np.eye(4)
    affine[:3, 0] = u * col_spacing
    affine[:3, 1] = v * row_spacing
    affine[:3, 2] = normal * gap
    affine[:3, 3] = origin
    info["slice_spacing_mm"] = float(gap)
    return AssembledStack(stack=np.ascontiguousarray(stack, dtype=np.float32), affine_lps=affine, info=info)
