"""Procedural chest CT backgrounds for the synthetic paired benchmark.

Why procedural at all: the shared real data is two patients, far too few distinct backgrounds for a
benchmark whose non-learned baseline (raw voxel similarity) must mostly see *background* variation.
A cheap parametric phantom gives an unlimited supply of different bodies, lungs and mediastina, each
with the masks (lungs, mediastinal fat) that the finding inserters need to put lesions in plausible places.

Conventions used by every ``synthetic_*`` module: arrays are ``(i, j, k)`` in RAS+ voxel order, so
``+i`` points to the patient's Right, ``+j`` Anterior and ``+k`` Superior. Low ``i`` is the patient's
left side, low ``j`` is posterior (dependent when supine), low ``k`` is caudal (the lung bases).
Everything is built in millimetres so the anatomy keeps its size whatever ``volume_shape`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LEFT, RIGHT = 1, 2  # codes in Anatomy.lung (patient's left / right lung)

FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
AIR_HU = -1000.0


@dataclass
class Anatomy:
    """A background volume plus the masks that tell finding inserters where lungs and mediastinum are.

    ``lung`` holds 0 (not lung), :data:`LEFT` or :data:`RIGHT`; ``mediastinum`` marks mediastinal fat
    (where enlarged lymph nodes live). ``midline_i`` splits left from right (voxel index along ``i``).
    """

    hu: np.ndarray  # float32 (i, j, k)
    lung: np.ndarray  # uint8 (i, j, k)
    mediastinum: np.ndarray  # bool (i, j, k)
    spacing: tuple[float, float, float]  # mm per voxel along i, j, k
    midline_i: float
    source: str  # "procedural" or "<patient>/<series folder>"


def centred_axes(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm along each axis, zero at the volume centre (float32, 1D)."""
    return [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing)]


def smooth_noise(shape: tuple[int, ...], cell_vox: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-ish std random field with correlation length ~``cell_vox`` voxels per axis.

    Interpolates coarse white noise at half resolution and repeats it 2x: ~8x cheaper than zooming to
    full size, and the 2-voxel blocks vanish under the lesion/anatomy contrast and CT noise.
    """
    half = tuple(max(1, (n + 1) // 2) for n in shape)
    coarse_shape = tuple(max(2, int(np.ceil(h / max(c / 2.0, 1.0))) + 1) for h, c in zip(half, cell_vox))
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    field = ndimage.zoom(coarse, [h / c for h, c in zip(half, coarse_shape)], order=1, grid_mode=False)
    field = field[tuple(slice(0, h) for h in half)]
    for axis in range(len(shape)):
        field = np.repeat(field, 2, axis=axis)
    field = field[tuple(slice(0, n) for n in shape)]
    std = float(field.std()) or 1.0
    return (field - float(field.mean())) / std


def _ellipse2d(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipse on the (i, j) plane (< 1 inside)."""
    return ((x[:, None] - cx) / a) ** 2 + ((y[None, :] - cy) / b) ** 2


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float], radii: tuple[float, float, float]
) -> np.ndarray:
    """Boolean ellipsoid on the full grid (axis-aligned; broadcasting keeps it one pass)."""
    return (
        ((x[:, None, None] - centre[0]) / radii[0]) ** 2
        + ((y[None, :, None] - centre[1]) / radii[1]) ** 2
        + ((z[None, None, :] - centre[2]) / radii[2]) ** 2
    ) < 1.0


def _z_range(z: np.ndarray, low: float, high: float) -> np.ndarray:
    """Slices whose centre lies in ``[low, high]`` as a broadcastable (1, 1, nz) mask."""
    return ((z >= low) & (z <= high))[None, None, :]


def _tube(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float
) -> np.ndarray:
    """Mask of a straight tube (capsule) between two mm points: per-slice discs along the segment.

    Vessels and airways here run mostly cranio-caudally, so a disc per slice at the interpolated
    centre is exact enough and costs only 2D work per slice touched.
    """
    mask = np.zeros((x.size, y.size, z.size), dtype=bool)
    z_lo, z_hi = min(start[2], end[2]) - radius, max(start[2], end[2]) + radius
    length_z = end[2] - start[2]
    dx_mm, dy_mm = float(x[1] - x[0]) if x.size > 1 else 1.0, float(y[1] - y[0]) if y.size > 1 else 1.0
    for k in np.flatnonzero((z >= z_lo) & (z <= z_hi)):
        t = 0.5 if abs(length_z) < 1e-6 else float(np.clip((z[k] - start[2]) / length_z, 0.0, 1.0))
        centre = start + t * (end - start)
        # only the few columns/rows the disc can touch
        i0 = max(0, int((centre[0] - radius - x[0]) / dx_mm))
        i1 = min(x.size, int((centre[0] + radius - x[0]) / dx_mm) + 2)
        j0 = max(0, int((centre[1] - radius - y[0]) / dy_mm))
        j1 = min(y.size, int((centre[1] + radius - y[0]) / dy_mm) + 2)
        if i0 >= i1 or j0 >= j1:
            continue
        disc = ((x[i0:i1, None] - centre[0]) ** 2 + (y[None, j0:j1] - centre[1]) ** 2) < radius**2
        mask[i0:i1, j0:j1, k] |= disc
    return mask


def _lung_mask(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    centre_xy: tuple[float, float],
    axes_xy: tuple[float, float],
    base_z: float,
    height: float,
    dome: float,
) -> np.ndarray:
    """One lung: an elliptic cylinder narrowing to a rounded apex, sitting on a diaphragm dome.

    The dome is highest centrally, so the lung base reaches lowest at its posterior/lateral rim: the
    costophrenic recess where a dependent effusion collects.
    """
    r2 = _ellipse2d(x, y, centre_xy[0], centre_xy[1], axes_xy[0], axes_xy[1])
    h = (z - base_z) / height
    scale = np.where(h < 0.55, 1.0, np.sqrt(np.clip(1.0 - ((h - 0.55) / 0.45) ** 2, 0.0, 1.0)))
    scale = np.where((h >= 0.0) & (h <= 1.0), scale, 0.0).astype(np.float32)
    inside = r2[:, :, None] < (scale**2)[None, None, :]
    above_dome = z[None, None, :] > (base_z + dome * np.clip(1.0 - r2, 0.0, 1.0))[:, :, None]
    return inside & above_dome


def _draw_vessels(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing: tuple[float, float, float],
    origin_mm: np.ndarray,
    hilum_mm: np.ndarray,
    lateral_sign: float,
    rng: np.random.Generator,
) -> None:
    """Branching pulmonary vessels radiating from a hilum (brighter centrally, fading peripherally).

    Drawn as random-walk polylines stamped voxel-wise and clipped to the lung: cheap, and after the
    5 mm downsampling they give the lungs the streaky texture real CT has.
    """
    step = 0.6 * min(spacing)
    n_branches = int(rng.integers(12, 22))
    spacing_arr = np.asarray(spacing, dtype=np.float32)
    for _ in range(n_branches):
        direction = np.array(
            [lateral_sign * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)], dtype=np.float32
        )
        direction /= np.linalg.norm(direction)
        length = rng.uniform(50.0, 120.0)
        n_steps = max(2, int(length / step))
        wobble = np.cumsum(rng.normal(0.0, 0.08, size=(n_steps, 3)).astype(np.float32), axis=0)
        dirs = direction[None, :] + wobble
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        points = hilum_mm[None, :] + np.cumsum(dirs * step, axis=0)
        t = np.linspace(0.0, 1.0, n_steps, dtype=np.float32)
        values = 30.0 - 600.0 * t  # partial volume: thick central vessels, thin peripheral ones
        idx = np.round((points - origin_mm[None, :]) / spacing_arr[None, :]).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(hu.shape)[None, :]), axis=1)
        idx, values = idx[ok], values[ok]
        if idx.size == 0:
            continue
        in_lung = lung[idx[:, 0], idx[:, 1], idx[:, 2]] > 0
        idx, values = idx[in_lung], values[in_lung]
        current = hu[idx[:, 0], idx[:, 1], idx[:, 2]]
        hu[idx[:, 0], idx[:, 1], idx[:, 2]] = np.maximum(current, values)


def procedural_chest(shape: tuple[int, int, int], rng: np.random.Generator) -> Anatomy:
    """A random chest phantom: body, fat, muscle, ribs, spine, lungs with vessels, heart, aorta, airways.

    Every size, position and intensity is drawn from ``rng`` so no two backgrounds are alike; the
    ranges are loose adult chest proportions (see the module docstring for axis directions).
    """
    nx, ny, nz = shape
    fov_xy = rng.uniform(330.0, 400.0)
    fov_z = rng.uniform(290.0, 360.0)
    s_xy = fov_xy / max(nx, ny)
    spacing = (float(s_xy), float(s_xy), float(fov_z / nz))
    x, y, z = centred_axes(shape, spacing)
    origin_mm = np.array([x[0], y[0], z[0]], dtype=np.float32)

    # --- body wall (z-invariant in-plane layers) ---
    a = min(rng.uniform(135.0, 175.0), 0.46 * fov_xy)
    b = a * rng.uniform(0.64, 0.80)
    cx, cy = rng.uniform(-15.0, 15.0), rng.uniform(-20.0, 10.0)
    fat_t, muscle_t, rib_t = rng.uniform(4.0, 24.0), rng.uniform(6.0, 14.0), rng.uniform(6.0, 9.0)
    a_c, b_c = a - fat_t - muscle_t - rib_t, b - fat_t - muscle_t - rib_t  # thoracic cavity
    body2d = _ellipse2d(x, y, cx, cy, a, b) < 1.0
    inner2d = _ellipse2d(x, y, cx, cy, a - fat_t, b - fat_t) < 1.0
    ribring_out2d = _ellipse2d(x, y, cx, cy, a_c + rib_t, b_c + rib_t) < 1.0
    cavity2d = _ellipse2d(x, y, cx, cy, a_c, b_c) < 1.0

    slice2d = np.full((nx, ny), AIR_HU, dtype=np.float32)
    slice2d[body2d] = FAT_HU + rng.uniform(-15.0, 15.0)
    slice2d[inner2d] = rng.uniform(35.0, 60.0)  # muscle
    slice2d[cavity2d] = rng.uniform(45.0, 60.0)  # default soft tissue (becomes abdomen under the domes)
    hu = np.repeat(slice2d[:, :, None], nz, axis=2)

    # ribs: slanted periodic bands on the ring just outside the cavity
    ring2d = ribring_out2d & ~cavity2d
    period = rng.uniform(22.0, 30.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    slant = (y[None, :] - cy) * rng.uniform(0.3, 0.6)  # ribs rise posteriorly
    band = np.sin(2.0 * np.pi * (z[None, None, :] + slant[:, :, None]) / period + phase) > 0.35
    rib_hu = rng.uniform(450.0, 800.0)
    hu[ring2d[:, :, None] & band] = rib_hu

    # --- lungs ---
    med_w = rng.uniform(45.0, 80.0)
    med_cx = cx - rng.uniform(0.0, 15.0)  # mediastinum sits slightly to the patient's left
    lung_height = min(rng.uniform(200.0, 270.0), 0.9 * fov_z)
    lung_top = z[-1] - rng.uniform(0.0, max(1.0, 0.95 * fov_z - lung_height - 20.0))
    base_z = lung_top - lung_height
    dome = rng.uniform(25.0, 55.0)
    dome_right_extra = rng.uniform(5.0, 20.0)  # the liver pushes the right hemidiaphragm up
    post_edge, ant_edge = cy - 0.97 * b_c, cy + rng.uniform(0.80, 0.95) * b_c
    lungs = np.zeros(shape, dtype=np.uint8)
    lung_fill = {}
    for code, sign in ((LEFT, -1.0), (RIGHT, 1.0)):
        lateral = cx + sign * 0.97 * a_c
        medial = med_cx + sign * med_w / 2.0
        half_w = abs(lateral - medial) / 2.0 * (rng.uniform(0.85, 0.97) if code == LEFT else rng.uniform(0.92, 1.0))
        centre = (lateral - sign * half_w, (post_edge + ant_edge) / 2.0)
        extra = dome_right_extra if code == RIGHT else 0.0
        mask = _lung_mask(x, y, z, centre, (half_w, (ant_edge - post_edge) / 2.0), base_z + extra, lung_height - extra, dome)
        lung_fill[code] = mask

    # heart: anterior, lower, shifted to the patient's left; it indents the left lung
    heart_c = (
        med_cx - rng.uniform(10.0, 30.0),
        cy + rng.uniform(0.05, 0.30) * b_c,
        base_z + dome * 0.6 + rng.uniform(25.0, 55.0),
    )
    heart_r = (rng.uniform(45.0, 65.0), rng.uniform(38.0, 52.0), rng.uniform(45.0, 60.0))
    heart = _ellipsoid(x, y, z, heart_c, heart_r)
    heart_pad = _ellipsoid(x, y, z, heart_c, tuple(r + rng.uniform(4.0, 10.0) for r in heart_r))

    # spine: vertebral body protruding into the posterior cavity, with discs and posterior elements
    r_v = rng.uniform(16.0, 22.0)
    spine_c = (cx + rng.uniform(-4.0, 4.0), cy - b_c + 0.6 * r_v)
    vert2d = _ellipse2d(x, y, spine_c[0], spine_c[1], r_v, r_v * 0.9) < 1.0
    cortex2d = vert2d & ~(_ellipse2d(x, y, spine_c[0], spine_c[1], r_v - 3.0, r_v * 0.9 - 3.0) < 1.0)
    canal_c = spine_c[1] - r_v - 6.0
    post2d = (_ellipse2d(x, y, spine_c[0], canal_c, 13.0, 10.0) < 1.0) | (
        _ellipse2d(x, y, spine_c[0], canal_c - 12.0, 4.5, 12.0) < 1.0
    )
    post2d &= inner2d
    canal2d = _ellipse2d(x, y, spine_c[0], canal_c, 6.5, 5.5) < 1.0
    disc_period = rng.uniform(24.0, 30.0)
    disc = (np.mod(z - rng.uniform(0.0, disc_period), disc_period) < 6.0)[None, None, :]
    spine_any2d = vert2d | post2d
    hu[vert2d] = rng.uniform(220.0, 320.0)
    hu[cortex2d] = rng.uniform(550.0, 800.0)
    hu[(post2d & ~vert2d)] = rng.uniform(450.0, 700.0)
    hu[canal2d] = rng.uniform(15.0, 35.0)
    hu[vert2d[:, :, None] & disc] = rng.uniform(70.0, 100.0)
    spine_guard = ndimage.binary_dilation(spine_any2d, iterations=2)

    # mediastinum: fat between the lungs above the diaphragm
    med2d = cavity2d & (np.abs(x[:, None] - med_cx) < med_w / 2.0 + 12.0) & ~spine_guard
    med_region = med2d[:, :, None] & _z_range(z, base_z + dome * 0.5, lung_top - 10.0)
    hu[med_region] = FAT_HU + rng.uniform(-15.0, 15.0)
    soft = rng.uniform(35.0, 50.0)

    # airways: trachea down to the carina, then two main bronchi towards the hila
    carina_z = lung_top - rng.uniform(70.0, 100.0)
    trach_xy = np.array([med_cx + rng.uniform(-5.0, 5.0), cy + rng.uniform(-0.35, -0.10) * b_c], dtype=np.float32)
    trach_r = rng.uniform(8.0, 11.0)
    top = np.array([*trach_xy, z[-1] + 5.0], dtype=np.float32)
    carina = np.array([*trach_xy, carina_z], dtype=np.float32)
    trachea_wall = _tube(x, y, z, top, carina, trach_r + 2.0)
    hila = {}
    for code, sign in ((LEFT, -1.0), (RIGHT, 1.0)):
        hila[code] = np.array(
            [med_cx + sign * (med_w / 2.0 + rng.uniform(2.0, 10.0)), trach_xy[1] + rng.uniform(-5.0, 10.0),
             carina_z - rng.uniform(15.0, 30.0)],
            dtype=np.float32,
        )
    airway = _tube(x, y, z, top, carina, trach_r)
    for code in (LEFT, RIGHT):
        airway |= _tube(x, y, z, carina, hila[code], trach_r * 0.7)
    # aorta: ascending (anterior-right), arch, descending (left of the spine)
    r_ao = rng.uniform(11.0, 16.0)
    arch_z = carina_z + rng.uniform(15.0, 35.0)
    asc = np.array([med_cx + rng.uniform(5.0, 20.0), trach_xy[1] + rng.uniform(25.0, 40.0)], dtype=np.float32)
    desc = np.array([spine_c[0] - r_v - r_ao * 0.6, spine_c[1] + r_v * 0.6], dtype=np.float32)
    aorta = _tube(x, y, z, np.array([*asc, heart_c[2]]), np.array([*asc, arch_z]), r_ao)
    aorta |= _tube(x, y, z, np.array([*desc, base_z]), np.array([*desc, arch_z]), r_ao * 0.9)
    arch_pts = np.linspace(0.0, 1.0, 6)
    for t0, t1 in zip(arch_pts[:-1], arch_pts[1:]):
        p0 = np.array([*(asc + t0 * (desc - asc)), arch_z + 8.0 * np.sin(np.pi * t0)])
        p1 = np.array([*(asc + t1 * (desc - asc)), arch_z + 8.0 * np.sin(np.pi * t1)])
        aorta |= _tube(x, y, z, p0, p1, r_ao)
    # pulmonary arteries / hilar vessels: soft-tissue blobs at each hilum
    hilar = np.zeros(shape, dtype=bool)
    for code in (LEFT, RIGHT):
        hilar |= _ellipsoid(x, y, z, tuple(hila[code]), (rng.uniform(9.0, 14.0),) * 2 + (rng.uniform(12.0, 20.0),))
    esoph = _tube(
        x, y, z, np.array([trach_xy[0] - 6.0, trach_xy[1] - trach_r - 7.0, z[-1]]),
        np.array([desc[0] + 8.0, desc[1] + 12.0, base_z]), rng.uniform(6.0, 9.0)
    )

    hu[heart_pad & med_region] = FAT_HU + rng.uniform(-20.0, 10.0)
    hu[heart] = rng.uniform(35.0, 50.0)
    hu[aorta] = rng.uniform(38.0, 55.0)
    hu[esoph & med_region] = soft
    hu[trachea_wall] = soft
    hu[airway] = AIR_HU + rng.uniform(0.0, 60.0)
    hu[hilar] = rng.uniform(35.0, 50.0)

    # lungs (carved around the heart, great vessels, spine and airways)
    exclude = heart_pad | aorta | hilar | trachea_wall | spine_guard[:, :, None]
    for code in (LEFT, RIGHT):
        lungs[lung_fill[code] & ~exclude & ~(lungs > 0)] = code
    is_lung = lungs > 0
    base_hu = rng.uniform(-880.0, -820.0)
    gradient = rng.uniform(10.0, 40.0) * np.clip(1.0 - (y - post_edge) / (ant_edge - post_edge), 0.0, 1.0)
    texture = smooth_noise(shape, (15.0 / s_xy, 15.0 / s_xy, 15.0 / spacing[2]), rng) * rng.uniform(10.0, 25.0)
    lung_hu = base_hu + gradient[None, :, None] + texture
    hu[is_lung] = lung_hu[is_lung]
    for code, sign in ((LEFT, -1.0), (RIGHT, 1.0)):
        _draw_vessels(hu, lungs, spacing, origin_mm, hila[code], sign, rng)

    mediastinum = med_region & ~(heart | aorta | airway | trachea_wall | esoph | hilar) & ~is_lung

    # below the domes: liver on the right, stomach (sometimes with an air bubble) on the left
    abdomen = cavity2d[:, :, None] & (z[None, None, :] < base_z + dome + dome_right_extra) & ~is_lung & ~med_region
    liver = abdomen & (x[:, None, None] > med_cx - rng.uniform(0.0, 30.0)) & (hu > 0) & (hu < 100)
    hu[liver] = rng.uniform(50.0, 65.0)
    if rng.random() < 0.5:
        bubble_c = (med_cx - rng.uniform(40.0, 80.0), cy + rng.uniform(0.0, 0.4) * b_c, base_z + rng.uniform(-10.0, 15.0))
        bubble = _ellipsoid(x, y, z, bubble_c, (rng.uniform(15.0, 35.0), rng.uniform(12.0, 25.0), rng.uniform(8.0, 15.0)))
        hu[bubble & abdomen & ~liver] = AIR_HU + rng.uniform(0.0, 50.0)

    # sternum
    stern2d = _ellipse2d(x, y, med_cx, cy + b - fat_t - 6.0, 14.0, 6.0) < 1.0
    hu[stern2d[:, :, None] & _z_range(z, heart_c[2] - 20.0, lung_top - 15.0)] = rng.uniform(300.0, 600.0)

    # patient table (optional): a shallow curved plate under the back
    if rng.random() < 0.6:
        table_y = cy - b - rng.uniform(3.0, 12.0)
        sag = 0.0008 * (x[:, None] - cx) ** 2
        yy = y[None, :] - (table_y + sag)
        plate2d = (yy < 0.0) & (yy > -rng.uniform(6.0, 14.0)) & (np.abs(x[:, None] - cx) < rng.uniform(170.0, 220.0))
        hu[plate2d & ~body2d] = rng.uniform(-250.0, 150.0)

    # scanner noise and global intensity calibration differences
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(6.0, 22.0))
    gain, offset = rng.uniform(0.97, 1.03), rng.uniform(-15.0, 15.0)
    hu = (AIR_HU + (hu - AIR_HU) * gain + offset).astype(np.float32)

    midline_i = float((med_cx - x[0]) / s_xy)
    return Anatomy(hu=hu, lung=lungs, mediastinum=mediastinum, spacing=spacing, midline_i=midline_i, source="procedural")
