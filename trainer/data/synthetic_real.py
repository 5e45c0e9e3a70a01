"""Real chest CT backgrounds for the synthetic benchmark, derived from the shared Lung-PET-CT-Dx series.

Why: procedural phantoms alone would let a model learn "phantom vs lesion" shortcuts; real scanner
texture (kernels, noise, real vessels, real mediastinum) keeps the benchmark honest. Four series from two
patients are far too few, so each volume gets its own *instance*: a random crop/zoom, left-right flip,
small in-plane rotation and intensity jitter, resampled onto the output grid.

Both patients have a large adenocarcinoma. Left in, it would be an unlabelled mass in every real
background; the collection's bounding boxes are therefore used to paint the tumour over with the mirrored
contralateral lung (see :func:`_lung_like_fill`) before any instance is made. This is approximate: a
small remnant next to the aorta (A0001) and a mediastinal contour notch stay, and other real pathology
(e.g. a hazy left lower lobe opacity in A0002) is untouched. The series are loaded once per run
(:func:`load_real_bank`) and kept at ~half in-plane resolution in memory.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .synthetic_anatomy import LEFT, RIGHT, Anatomy, smooth_noise

log = logging.getLogger(__name__)

LUNG_CODE, MEDIASTINUM_CODE = 1, 2  # RealSeries.codes values


@dataclass(frozen=True)
class RealSeries:
    """One real series at reduced in-plane resolution, RAS voxel order, plus tissue codes.

    Coordinates of voxel ``p`` in this array are ``p * spacing`` mm (origin at voxel 0): only relative
    geometry matters for deriving instances.
    """

    name: str  # folder name, e.g. "Lung_Dx-A0001_series2_5mm"
    patient: str  # "A0001"
    hu: np.ndarray  # float32 (i, j, k)
    codes: np.ndarray  # uint8: 0 other, LUNG_CODE, MEDIASTINUM_CODE
    spacing: tuple[float, float, float]
    body_centre_mm: tuple[float, float]  # (x, y) centre of the body outline, mm in array coordinates

    @property
    def source(self) -> str:
        """``<patient>/<folder>``: recorded per volume so split hygiene can be audited."""
        return f"{self.patient}/{self.name}"


def patient_of(folder_name: str) -> str:
    """``Lung_Dx-A0001_series2_5mm`` -> ``A0001`` (the collection's subject id)."""
    for part in folder_name.replace("-", "_").split("_"):
        if len(part) == 5 and part[0].isalpha() and part[1:].isdigit():
            return part
    return folder_name


def _tumour_boxes_ras(ct_root: Path, patient: str, folders: list[Path]) -> list[np.ndarray]:
    """The patient's annotated tumour boxes as RAS mm corner points (one (N, 3) array per box).

    The XML files are named by SOPInstanceUID, so the DICOM headers (not pixels) are read to find each
    annotated slice's position and pixel geometry.
    """
    ann_dir = ct_root / "annotations" / patient
    if not ann_dir.is_dir():
        return []
    import pydicom  # a runtime dependency of the project; imported here to keep module import cheap

    headers: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for folder in folders:
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            ps = np.asarray([float(v) for v in ds.PixelSpacing])
            headers[str(ds.SOPInstanceUID)] = (ipp, iop, ps)
    boxes: list[np.ndarray] = []
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for xml_path in sorted(ann_dir.glob("*.xml")):
        geometry = headers.get(xml_path.stem)
        if geometry is None:
            continue
        ipp, iop, ps = geometry
        for box in ET.parse(xml_path).getroot().iter("bndbox"):
            cols = [float(box.findtext("xmin", "0")), float(box.findtext("xmax", "0"))]
            rows = [float(box.findtext("ymin", "0")), float(box.findtext("ymax", "0"))]
            corners = [ipp + iop[:3] * ps[1] * c + iop[3:] * ps[0] * r for c in cols for r in rows]
            boxes.append(np.asarray(corners) * lps_to_ras)
    return boxes


def _lung_like_fill(
    hu: np.ndarray,
    affine: np.ndarray,
    boxes: list[np.ndarray],
    body_centre_i: float,
    rng: np.random.Generator,
    margin_mm: float = 6.0,
) -> int:
    """Paint the annotated tumour over with the mirrored contralateral lung, in place; returns voxels changed.

    Slice by slice, inside the boxes annotated within half a slice (plus ``margin_mm``) of that slice,
    a voxel is replaced by its mirror image across the body midline when it is soft tissue here but
    aerated lung on the other side: that is the tumour (the chest is roughly symmetric), while chest
    wall and spine, soft tissue on both sides, stay. Mirroring keeps real lung texture and vessels, so
    the patch does not read as a flat hole.
    """
    if not boxes:
        return 0
    inv = np.linalg.inv(affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    z_of_k = (affine @ np.array([[0.0, 0.0, k, 1.0] for k in range(hu.shape[2])]).T)[2]
    changed = 0
    for k in range(hu.shape[2]):
        near = [b for b in boxes if abs(float(b[:, 2].mean()) - z_of_k[k]) <= spacing[2] / 2.0 + margin_mm]
        if not near:
            continue
        pts = np.concatenate(near, axis=0)
        corners = np.array([[x, y, z_of_k[k], 1.0] for x in (pts[:, 0].min() - margin_mm, pts[:, 0].max() + margin_mm)
                            for y in (pts[:, 1].min() - margin_mm, pts[:, 1].max() + margin_mm)])
        vox = (inv @ corners.T).T[:, :2]
        lo = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, np.asarray(hu.shape[:2]) - 1)
        hi = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 1, 1, np.asarray(hu.shape[:2]))
        plane = hu[:, :, k]
        mirror_i = np.clip(np.round(2.0 * body_centre_i - np.arange(lo[0], hi[0])).astype(int), 0, hu.shape[0] - 1)
        window = plane[lo[0] : hi[0], lo[1] : hi[1]]
        mirrored = plane[mirror_i, lo[1] : hi[1]]
        target = (window > -600) & (window < 250) & (mirrored < -600)
        target = ndimage.binary_dilation(target, iterations=1) & (window > -600) & (window < 250)
        if not target.any():
            continue
        window[target] = mirrored[target] + rng.normal(0.0, 10.0, size=int(target.sum())).astype(np.float32)
        changed += int(target.sum())
    return changed


def _downsample_inplane(hu: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean over ``factor x factor`` in-plane: anti-aliased and 4x smaller to keep in memory."""
    if factor <= 1:
        return hu
    nx, ny, nz = (hu.shape[0] // factor) * factor, (hu.shape[1] // factor) * factor, hu.shape[2]
    return hu[:nx, :ny, :].reshape(nx // factor, factor, ny // factor, factor, nz).mean(axis=(1, 3)).astype(np.float32)


def _tissue_codes(hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Lung (aerated, inside the body) and mediastinum (between the lungs, fat/soft tissue) codes.

    Returns the codes and the in-plane centre (voxel indices) of the body outline.
    """
    body = hu > -500
    labels, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum_labels(body, labels, index=np.arange(1, n + 1))
        body = labels == (int(np.argmax(sizes)) + 1)
    filled = ndimage.binary_fill_holes(body, structure=np.ones((3, 3, 1), dtype=bool))
    air = (hu < -400) & filled & ~body
    labels, n = ndimage.label(air)
    lung = np.zeros_like(air)
    if n:
        sizes = ndimage.sum_labels(air, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.15 * sizes.max()) + 1
        lung = np.isin(labels, keep)
    # between the first and last lung voxel of each (j, k) row, excluding lung, bone and gas
    any_lung = lung.any(axis=0)
    first = np.argmax(lung, axis=0)
    last = lung.shape[0] - 1 - np.argmax(lung[::-1], axis=0)
    ii = np.arange(lung.shape[0])[:, None, None]
    between = any_lung[None] & (ii > first[None]) & (ii < last[None])
    mediastinum = between & ~lung & (hu > -250) & (hu < 120)
    # drop intrapulmonary vessels (thin, isolated) and keep the one central block
    mediastinum = ndimage.binary_opening(mediastinum, structure=np.ones((3, 3, 1), dtype=bool), iterations=2)
    labels, n = ndimage.label(mediastinum)
    if n > 1:
        sizes = ndimage.sum_labels(mediastinum, labels, index=np.arange(1, n + 1))
        mediastinum = labels == (int(np.argmax(sizes)) + 1)
    codes = np.zeros(hu.shape, dtype=np.uint8)
    codes[lung] = LUNG_CODE
    codes[mediastinum] = MEDIASTINUM_CODE
    coords = np.argwhere(body.any(axis=2))
    centre = tuple(int(v) for v in coords.mean(axis=0)) if len(coords) else (hu.shape[0] // 2, hu.shape[1] // 2)
    return codes, centre  # type: ignore[return-value]


def load_real_series(folder: Path, boxes: list[np.ndarray] | None = None) -> RealSeries:
    """Load one series with the project's DICOM loader, remove the tumour, downsample, compute codes."""
    from model_export.preprocessing import load_dicom_series, reorient_to_ras

    volume = reorient_to_ras(load_dicom_series(folder))
    hu = np.clip(np.asarray(volume.array, dtype=np.float32), -1024.0, 3071.0)
    spacing_full = volume.spacing
    factor = max(1, int(round(1.5 / max(spacing_full[0], 1e-3))))  # ~1.3-1.7 mm in-plane
    small = _downsample_inplane(hu, factor)
    step = np.diag([factor, factor, 1.0, 1.0])
    step[:2, 3] = (factor - 1) / 2.0  # new voxel t is centred on old voxel t*factor + (factor-1)/2
    affine = volume.affine @ step
    spacing = (spacing_full[0] * factor, spacing_full[1] * factor, spacing_full[2])
    columns = np.flatnonzero((small > -500).any(axis=(1, 2)))  # left-right extent of body (and table)
    mid_i = float(columns.mean()) if len(columns) else small.shape[0] / 2.0
    painted = _lung_like_fill(small, affine, boxes or [], mid_i, np.random.default_rng(20240611))
    codes, centre = _tissue_codes(small)
    log.info("real background %s: %d tumour voxels painted over, kept %s at %s mm", folder.name, painted, small.shape,
             tuple(round(s, 2) for s in spacing))
    return RealSeries(
        name=folder.name,
        patient=patient_of(folder.name),
        hu=small,
        codes=codes,
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        body_centre_mm=(centre[0] * spacing[0], centre[1] * spacing[1]),
    )


def load_real_bank(ct_root: Path | None) -> list[RealSeries]:
    """Every ``Lung_Dx-*`` series under ``ct_root`` (empty, with a warning, when unavailable)."""
    if ct_root is None or not Path(ct_root).is_dir():
        log.warning("synthetic benchmark: no real CT folder (%s); using procedural backgrounds only", ct_root)
        return []
    ct_root = Path(ct_root)
    folders = sorted(p for p in ct_root.iterdir() if p.is_dir() and any(p.glob("*.dcm")))
    by_patient: dict[str, list[Path]] = {}
    for folder in folders:
        by_patient.setdefault(patient_of(folder.name), []).append(folder)
    bank: list[RealSeries] = []
    for patient, patient_folders in sorted(by_patient.items()):
        boxes = _tumour_boxes_ras(ct_root, patient, patient_folders)
        for folder in patient_folders:
            try:
                bank.append(load_real_series(folder, boxes))
            except Exception as exc:  # one unreadable series must not sink the benchmark
                log.warning("synthetic benchmark: skipping real series %s: %s", folder, exc)
    return bank


def _codes_on_grid(codes: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour tissue codes on the output grid, sampled at half resolution and repeated 2x.

    Masks only steer where lesions go (and lesions are blended, not stamped), so ~2-voxel precision is
    plenty and costs an eighth of a full-resolution resample.
    """
    half = tuple((n + 1) // 2 for n in shape)
    coarse = ndimage.affine_transform(codes, matrix * 2.0, offset + matrix @ np.full(3, 0.5), output_shape=half,
                                      order=0, cval=0)
    for axis in range(3):
        coarse = np.repeat(coarse, 2, axis=axis)
    return np.ascontiguousarray(coarse[: shape[0], : shape[1], : shape[2]])


def real_instance(series: RealSeries, shape: tuple[int, int, int], rng: np.random.Generator) -> Anatomy:
    """A unique background from one real series: random crop/zoom, L-R flip, rotation, intensity jitter.

    The output grid is RAS with its own spacing (field of view / shape); a flip mirrors the anatomy
    (heart on the right), which is fine: laterality of findings is decided after this step.
    """
    nx, ny, nz = shape
    src_shape = np.asarray(series.hu.shape, dtype=np.float64)
    src_spacing = np.asarray(series.spacing, dtype=np.float64)
    extent_z = src_shape[2] * src_spacing[2]
    flip = rng.random() < 0.5
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    fov_xy = rng.uniform(320.0, 400.0)
    fov_z = extent_z * rng.uniform(0.8, 1.0)
    centre = np.array(
        [
            series.body_centre_mm[0] + rng.uniform(-20.0, 20.0),
            series.body_centre_mm[1] + rng.uniform(-20.0, 20.0),
            rng.uniform(fov_z / 2.0, extent_z - fov_z / 2.0) - src_spacing[2] / 2.0,
        ]
    )
    s_xy = fov_xy / max(nx, ny)
    out_spacing = np.array([s_xy, s_xy, fov_z / nz])
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    scale_out = out_spacing * np.array([-1.0 if flip else 1.0, 1.0, 1.0])
    matrix = np.diag(1.0 / src_spacing) @ rotation @ np.diag(scale_out)
    out_centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    offset = centre / src_spacing - matrix @ out_centre
    hu = ndimage.affine_transform(series.hu, matrix, offset, output_shape=shape, order=1, cval=-1024.0)
    codes = _codes_on_grid(series.codes, matrix, offset, shape)

    gain, shift = rng.uniform(0.97, 1.03), rng.uniform(-20.0, 20.0)
    hu = -1000.0 + (hu + 1000.0) * gain + shift
    sigma = rng.uniform(0.0, 15.0)
    if sigma > 1.0:
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    hu += smooth_noise(shape, (40.0 / s_xy,) * 2 + (40.0 / out_spacing[2],), rng) * np.float32(rng.uniform(0.0, 10.0))

    mediastinum = codes == MEDIASTINUM_CODE
    profile = mediastinum.sum(axis=(1, 2)).astype(np.float64)
    if profile.sum() > 0:
        midline = float(np.searchsorted(np.cumsum(profile), profile.sum() / 2.0))
    else:
        midline = (nx - 1) / 2.0
    lung = codes == LUNG_CODE
    side = np.where(np.arange(nx)[:, None, None] < midline, LEFT, RIGHT).astype(np.uint8)
    return Anatomy(
        hu=hu.astype(np.float32),
        lung=np.where(lung, side, 0).astype(np.uint8),
        mediastinum=mediastinum,
        spacing=tuple(float(s) for s in out_spacing),  # type: ignore[arg-type]
        midline_i=midline,
        source=series.source,
    )
