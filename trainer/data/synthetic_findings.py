"""Insert the six benchmark findings into a background (:class:`~.synthetic_anatomy.Anatomy`), in place.

Why these shapes and numbers: every finding must survive the training preprocessing (HU window
[-1000, 1000] -> [0, 1], resize to ~64x64x32, i.e. ~5 mm in-plane and ~10 mm slices), so sizes start
around 1 cm for nodules and several cm for extended findings, while intensities follow real CT:
soft-tissue lesions 0-60 HU in -850 HU lung, effusion 0-20 HU, nodes ~35 HU against -100 HU fat,
emphysema ~-980 HU. Positions come from the background's own lung/mediastinum masks, so the same
code works on procedural phantoms and on real series.

Generator 1.3 gave each finding a signature of its own, because a CNN trained for minutes picked up
only "more soft tissue in the lung" when nodules, consolidation, atelectasis and nodes were all
similar blobs (the image tower alone, supervised on the labels, reached held-out AUC ~0.7 for each):
consolidation is lobar with air bronchograms, atelectasis is a collapse against the mediastinum with
an elevated hemidiaphragm (volume loss), nodules come several at a time and only in still-aerated lung,
nodes are bulkier. Measured with ``medfinder label-bound`` at 8 epochs: held-out AUC nodule 0.82,
consolidation 0.97, atelectasis 0.85, lymphadenopathy 0.84 (effusion 0.99, emphysema 0.92).

Ground truth is what was inserted: every :class:`Lesion` records finding, side, zone, size and HU, and
the report is written from these records only (never the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import ndimage

from config.settings import SYNTHETIC_FINDINGS

from .synthetic_anatomy import LEFT, RIGHT, Anatomy, smooth_noise

FINDINGS: tuple[str, ...] = SYNTHETIC_FINDINGS
DEFAULT_PROBABILITY = 0.35  # each finding independently; ~7% of studies come out normal
AERATED_MAX_HU = -400.0  # lung denser than this is no longer air-filled
SIDE_NAMES = {LEFT: "left", RIGHT: "right"}
SIDE_CODES = {"left": LEFT, "right": RIGHT}


@dataclass
class Lesion:
    """One inserted lesion instance. ``region``/``mask`` locate its voxels (kept in memory for tests)."""

    lesion_id: str
    finding: str
    side: str  # "left" / "right" (the patient's)
    zone: str  # "upper" / "lower" (half of that lung's cranio-caudal extent)
    size_mm: float  # diameter, largest extent or thickness (see each inserter)
    hu: float  # the attenuation painted in
    centre_vox: tuple[float, float, float]
    volume_ml: float
    attrs: dict[str, Any] = field(default_factory=dict)
    region: tuple[slice, slice, slice] | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON-able record written to benchmark.json (no arrays)."""
        return {
            "lesion_id": self.lesion_id,
            "finding": self.finding,
            "side": self.side,
            "zone": self.zone,
            "size_mm": round(self.size_mm, 1),
            "hu": round(self.hu, 1),
            "centre_vox": [round(v, 1) for v in self.centre_vox],
            "volume_ml": round(self.volume_ml, 2),
            "attrs": self.attrs,
        }


@dataclass(frozen=True)
class FindingSummary:
    """What a report can say about one present finding (aggregated over its lesions)."""

    finding: str
    laterality: str  # "left" / "right" / "bilateral"
    zone: str  # "upper" / "lower"
    size_mm: float
    count: int
    attrs: dict[str, Any]


# ----------------------------------------------------------------------------- geometry helpers


class _Sites:
    """Candidate voxel positions per lung side and zone, computed lazily once per volume."""

    def __init__(self, anatomy: Anatomy) -> None:
        """Nothing is computed until an inserter asks (most volumes need only a few lookups)."""
        self.anatomy = anatomy
        self._coords: dict[int, np.ndarray] = {}
        self._mid: dict[int, float] = {}
        self._depth: dict[int, np.ndarray] = {}

    def lung(self, code: int) -> np.ndarray:
        """All (i, j, k) voxels of one lung."""
        if code not in self._coords:
            coords = np.argwhere(self.anatomy.lung == code)
            self._coords[code] = coords
            self._mid[code] = float((coords[:, 2].min() + coords[:, 2].max()) / 2.0) if len(coords) else 0.0
        return self._coords[code]

    def mid_k(self, code: int) -> float:
        """The slice index halfway up that lung: the boundary between its upper and lower zone."""
        self.lung(code)
        return self._mid[code]

    def forget(self) -> None:
        """Drop cached positions after an inserter changed ``anatomy.lung`` (e.g. an elevated hemidiaphragm)."""
        self._coords.clear()
        self._mid.clear()
        self._depth.clear()

    def zone_of(self, code: int, k: float) -> str:
        """``upper`` or ``lower``: above or below the middle of that lung's slice range."""
        self.lung(code)
        return "upper" if k >= self._mid[code] else "lower"

    def lung_zone(self, code: int, zone: str) -> np.ndarray:
        """The lung's voxels in one zone (the whole lung if the zone is empty)."""
        coords = self.lung(code)
        if not len(coords):
            return coords
        keep = coords[:, 2] >= self._mid[code] if zone == "upper" else coords[:, 2] < self._mid[code]
        return coords[keep] if keep.any() else coords

    def depth_mm(self, code: int) -> np.ndarray:
        """Per voxel of :meth:`lung`: distance (mm) to the nearest voxel outside that lung."""
        if code not in self._depth:
            inside = self.anatomy.lung == code
            distance = ndimage.distance_transform_edt(inside, sampling=self.anatomy.spacing)
            coords = self.lung(code)
            self._depth[code] = distance[coords[:, 0], coords[:, 1], coords[:, 2]].astype(np.float32)
        return self._depth[code]

    def deep_lung_zone(self, code: int, zone: str, min_depth_mm: float) -> np.ndarray:
        """Still-aerated zone voxels at least ``min_depth_mm`` from the pleura (else the deepest tenth).

        Why: a nodule centred near the chest wall is clipped to the lung and merges with the wall, and
        one centred in an earlier consolidation vanishes into it: either way the report would name a
        lesion the image barely shows.
        """
        coords, depth = self.lung(code), self.depth_mm(code)
        if not len(coords):
            return coords
        in_zone = coords[:, 2] >= self._mid[code] if zone == "upper" else coords[:, 2] < self._mid[code]
        if not in_zone.any():
            in_zone = np.ones(len(coords), dtype=bool)
        deep = in_zone & (depth >= min_depth_mm) & (self.anatomy.hu[coords[:, 0], coords[:, 1], coords[:, 2]] < AERATED_MAX_HU)
        if not deep.any():
            deep = in_zone & (depth >= np.quantile(depth[in_zone], 0.9))
        return coords[deep]


def _box(
    centre: np.ndarray, half_mm: np.ndarray | float, spacing: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice], list[np.ndarray]]:
    """A voxel box around ``centre`` (voxels) reaching ``half_mm`` each way, and mm offsets per axis."""
    half_vox = np.ceil(np.asarray(half_mm) / spacing).astype(int) + 1
    lo = np.maximum(np.floor(centre).astype(int) - half_vox, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half_vox + 1, np.asarray(shape))
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    offsets = [((np.arange(a, b) - c) * s).astype(np.float32) for a, b, c, s in zip(lo, hi, centre, spacing)]
    return region, offsets  # type: ignore[return-value]


def _grid(offsets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable mm offset arrays (dx, dy, dz) for a box."""
    return offsets[0][:, None, None], offsets[1][None, :, None], offsets[2][None, None, :]


def _ellipsoid(
    centre: np.ndarray, radii: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int]
) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Box around an ellipsoid (30 % margin), its mm offset grids, and the normalised radius ``rho``."""
    region, offsets = _box(centre, radii.max() * 1.3, spacing, shape)
    dx, dy, dz = _grid(offsets)
    rho = np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    return region, (dx, dy, dz), rho


def _soft(distance_inside_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume edge: 1 deep inside, 0 outside, linear over ``edge_mm`` around the boundary."""
    return np.clip(distance_inside_mm / max(edge_mm, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)


def _paint(hu: np.ndarray, region: tuple[slice, ...], alpha: np.ndarray, value: np.ndarray | float,
           allowed: np.ndarray) -> np.ndarray:
    """Blend ``value`` into ``hu[region]`` with weight ``alpha`` where ``allowed``; returns the mask."""
    weight = np.where(allowed, alpha, 0.0).astype(np.float32)
    view = hu[region]
    view += weight * (np.asarray(value, dtype=np.float32) - view)
    return weight >= 0.5


def _stamp_line(hu: np.ndarray, start: np.ndarray, direction: np.ndarray, length_mm: float, value: float,
                spacing: np.ndarray, allowed: np.ndarray) -> None:
    """Draw a 1-voxel line (spicule, air bronchogram) where ``allowed`` (full-volume mask)."""
    n = max(2, int(length_mm / (0.5 * spacing.min())))
    pts = start[None, :] + np.linspace(0.0, length_mm, n)[:, None] * (direction / np.linalg.norm(direction))[None, :] / spacing
    idx = np.round(pts).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(hu.shape)), axis=1)
    idx = idx[ok]
    if len(idx):
        idx = idx[allowed[idx[:, 0], idx[:, 1], idx[:, 2]]]
        hu[idx[:, 0], idx[:, 1], idx[:, 2]] = value


def _aerated(anatomy: Anatomy, region: tuple[slice, ...]) -> np.ndarray:
    """Lung voxels of ``region`` still holding air now (not yet consolidated, collapsed or filled).

    Why: a nodule painted into an earlier consolidation, or a node bulging into collapsed lung, is
    invisible; the report would name a finding the image cannot show.
    """
    return (anatomy.lung[region] > 0) & (anatomy.hu[region] < AERATED_MAX_HU)


def _sides_for(laterality: str) -> list[int]:
    """Lung codes a finding with this laterality must touch."""
    return [LEFT, RIGHT] if laterality == "bilateral" else [SIDE_CODES[laterality]]


def _pick(coords: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random candidate voxel with sub-voxel jitter (float voxel coordinates)."""
    return coords[int(rng.integers(len(coords)))].astype(np.float64) + rng.uniform(-0.5, 0.5, size=3)


def _lateral_sign(code: int) -> float:
    """+1 for the right lung, -1 for the left: the sign of "outwards" along i (RAS: right is larger i)."""
    return 1.0 if code == RIGHT else -1.0


def _side_of(anatomy: Anatomy, i: float) -> str:
    """The patient side of a voxel column (RAS: larger i is the patient's right)."""
    return "right" if i >= anatomy.midline_i else "left"


# ----------------------------------------------------------------------------- the inserters

InsertFn = Callable[[Anatomy, _Sites, np.random.Generator, str, str], list[Lesion]]


def _insert_nodules(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Two to five round soft-tissue nodules (18-34 mm) or one mass (35-60 mm), sometimes spiculated, in the lung."""
    spacing = np.asarray(anatomy.spacing)
    mass = rng.random() < 0.2
    count = 1 if mass else int(rng.choice([2, 3, 3, 4, 5]))
    sides = _sides_for(laterality)
    if laterality == "bilateral":
        count = max(count, 2)
        mass = False
    spiculated = rng.random() < (0.5 if mass else 0.25)
    value = rng.uniform(10.0, 60.0)
    lesions: list[Lesion] = []
    for n in range(count):
        code = sides[n % len(sides)]
        diameter = rng.uniform(35.0, 60.0) if mass else (rng.uniform(20.0, 34.0) if n == 0 else rng.uniform(18.0, 30.0))
        radii = diameter / 2.0 * rng.uniform(0.85, 1.15, size=3)
        coords = sites.deep_lung_zone(code, zone, min_depth_mm=0.8 * float(radii.max()) + 4.0)
        if not len(coords):
            continue
        waves = rng.normal(0.0, 1.0, size=(2, 3)) * (2.5 / diameter)
        phases = rng.uniform(0.0, 2.0 * np.pi, size=2)
        best = None
        for _ in range(25):
            centre = _pick(coords, rng)
            region, (dx, dy, dz), rho = _ellipsoid(centre, radii, spacing, anatomy.hu.shape)
            bumps = sum(0.08 * np.sin(w[0] * dx + w[1] * dy + w[2] * dz + p) for w, p in zip(waves, phases))
            alpha = _soft((1.0 - rho + bumps) * radii.mean(), 0.7 * spacing.min())
            body = alpha >= 0.5
            if not body.any():
                continue
            inside = float(_aerated(anatomy, region)[body].mean())
            if best is None or inside > best[0]:
                best = (inside, centre, region, alpha)
            if inside >= (0.8 if mass else 0.9):
                break
        if best is None or best[0] < 0.4:
            continue
        _, centre, region, alpha = best
        allowed = anatomy.lung[region] > 0
        texture = value + rng.normal(0.0, 8.0, size=alpha.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, alpha, texture, allowed)
        if spiculated:
            lung_full = anatomy.lung > 0
            for _ in range(int(rng.integers(6, 13))):
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                start = centre + direction * radii.mean() * 0.8 / spacing
                _stamp_line(anatomy.hu, start, direction, radii.mean() * rng.uniform(0.5, 1.0), value - 120.0, spacing, lung_full)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        lesions.append(
            Lesion(
                lesion_id="",
                finding="nodule",
                side=_side_of(anatomy, centre[0]),
                zone=sites.zone_of(code, centre[2]),
                size_mm=float(2.0 * radii.mean()),
                hu=float(value),
                centre_vox=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                volume_ml=float(mask.sum()) * voxel_ml,
                attrs={"mass": bool(mass or diameter >= 30.0), "spiculated": bool(spiculated)},
                region=region,
                mask=mask,
            )
        )
    return lesions


def _zone_box(anatomy: Anatomy, sites: _Sites, code: int, zone: str) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """The bounding box of one lung and, inside it, that lung's voxels in ``zone`` (the whole lung if empty)."""
    coords = sites.lung(code)
    if len(coords) < 40:
        return None
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    in_lung = anatomy.lung[region] == code
    k = np.arange(lo[2], hi[2])
    in_zone = (k >= sites.mid_k(code)) if zone == "upper" else (k < sites.mid_k(code))
    allowed = in_lung & in_zone[None, None, :]
    return region, (allowed if allowed.sum() >= 40 else in_lung)  # type: ignore[return-value]


def _offsets_mm(region: tuple[slice, slice, slice], point: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, ...]:
    """Broadcastable mm offsets of every voxel of ``region`` from ``point`` (voxel coordinates)."""
    return _grid([((np.arange(r.start, r.stop) - c) * s).astype(np.float32) for r, c, s in zip(region, point, spacing)])


def _stamp_tube(hu: np.ndarray, start: np.ndarray, direction: np.ndarray, length_mm: float, value: float,
                spacing: np.ndarray, allowed: np.ndarray) -> None:
    """A line two voxels thick in-plane (a lobar or segmental bronchus is 5-8 mm wide)."""
    for offset in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)):
        _stamp_line(hu, start + np.asarray(offset, dtype=np.float64), direction, length_mm, value, spacing, allowed)


def _insert_consolidation(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Lobar or segmental airspace consolidation (10-50 HU) filling 30-65 % of one zone, with air bronchograms.

    The region grows from a random point of the zone (distance plus smooth noise, thresholded at the
    fill fraction) and stops at the zone's boundary as a lobe stops at its fissure; air-filled bronchi
    (two voxels wide) run through it from its medial side outwards. Why lobar: pneumonia classically
    fills a lobe or segment, and at the model's ~5 x 5 x 10 mm grid a region this size is a shape of its
    own, distinct from a nodule (small, round, surrounded by aerated lung), a collapse (a wedge against
    the mediastinum with an elevated hemidiaphragm) and an effusion (a dependent crescent).
    """
    spacing = np.asarray(anatomy.spacing)
    value = rng.uniform(10.0, 50.0)
    fill = rng.uniform(0.3, 0.65)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions: list[Lesion] = []
    for code in _sides_for(laterality):
        box = _zone_box(anatomy, sites, code, zone)
        if box is None:
            continue
        region, allowed = box
        origin = np.array([r.start for r in region], dtype=np.float64)
        seed = _pick(np.argwhere(allowed), rng) + origin
        dx, dy, dz = _offsets_mm(region, seed, spacing)
        distance = np.sqrt(dx**2 + dy**2 + dz**2)
        noise = smooth_noise(allowed.shape, tuple(max(1.5, 18.0 / s) for s in spacing), rng)
        score = -distance / 45.0 + 0.5 * noise
        threshold = float(np.quantile(score[allowed], 1.0 - fill))
        alpha = np.clip((score - threshold) / 0.08 + 0.5, 0.0, 1.0).astype(np.float32)
        texture = value + 12.0 * rng.standard_normal(alpha.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, alpha, texture, allowed)
        volume = float(mask.sum()) * voxel_ml
        if volume < 20.0:
            continue
        idx = np.argwhere(mask) + origin.astype(int)
        centre = idx.mean(axis=0)
        inside = np.zeros(anatomy.hu.shape, dtype=bool)
        inside[region] = mask
        lateral = _lateral_sign(code)
        medial_end = idx[np.argsort(lateral * (idx[:, 0] - anatomy.midline_i))[: max(1, len(idx) // 10)]]
        for _ in range(int(rng.integers(3, 6))):
            start = medial_end[int(rng.integers(len(medial_end)))].astype(np.float64)
            direction = np.array([lateral, rng.uniform(-0.8, 0.8), rng.uniform(-0.4, 0.4)])
            _stamp_tube(anatomy.hu, start, direction, rng.uniform(40.0, 90.0), rng.uniform(-930.0, -870.0), spacing, inside)
        extent = float(((idx.max(axis=0) - idx.min(axis=0) + 1) * spacing).max())
        lesions.append(
            Lesion("", "consolidation", SIDE_NAMES[code], zone, extent, float(value),
                   tuple(float(c) for c in centre), volume, {"air_bronchograms": True, "fill": round(float(fill), 3)},  # type: ignore[arg-type]
                   region, mask)
        )
    return lesions


def _insert_effusion(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Dependent posterior crescent of fluid (0-20 HU) at the lung base, thickest at the bottom.

    Fills each (i, k) column of the lung from its most posterior voxel forward by a thickness that
    tapers from ``t_max`` at the base to zero ``height`` mm above it: the classic supine meniscus.
    """
    spacing = np.asarray(anatomy.spacing)
    value = rng.uniform(0.0, 20.0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions: list[Lesion] = []
    for code in _sides_for(laterality):
        lung = anatomy.lung == code
        per_slice = lung.sum(axis=(0, 1))
        slices = np.flatnonzero(per_slice >= 10)
        if not len(slices):
            continue
        t_max = rng.uniform(12.0, 40.0)
        height = rng.uniform(50.0, 110.0)
        k0 = int(slices[0])
        k1 = min(anatomy.hu.shape[2], k0 + int(np.ceil(height / spacing[2])) + 1)
        sub = lung[:, :, k0:k1]
        height_mm = (np.arange(k0, k1) - k0) * spacing[2]
        thickness = t_max * np.clip(1.0 - height_mm / height, 0.0, 1.0) ** 0.6
        first = np.argmax(sub, axis=1)  # most posterior lung voxel per (i, k)
        depth = (np.arange(sub.shape[1])[None, :, None] - first[:, None, :]) * spacing[1]
        mask = sub & (depth < thickness[None, None, :])
        if float(mask.sum()) * voxel_ml < 8.0:
            continue
        region = (slice(0, anatomy.hu.shape[0]), slice(0, anatomy.hu.shape[1]), slice(k0, k1))
        texture = value + 6.0 * rng.standard_normal(mask.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, np.ones(mask.shape, dtype=np.float32), texture, mask)
        idx = np.argwhere(mask)
        centre = idx.mean(axis=0) + np.array([0, 0, k0])
        severity = "small" if t_max < 20.0 else ("moderate" if t_max < 30.0 else "large")
        lesions.append(
            Lesion("", "pleural effusion", SIDE_NAMES[code], "lower", float(t_max), float(value),
                   tuple(float(c) for c in centre), float(mask.sum()) * voxel_ml,  # type: ignore[arg-type]
                   {"severity": severity, "height_mm": round(float(height), 1)}, region, mask)
        )
    return lesions


def _elevate_hemidiaphragm(anatomy: Anatomy, sites: _Sites, code: int, lift_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Volume loss: the lowest ``lift_mm`` of every column of one lung becomes sub-diaphragmatic soft tissue.

    Returns the converted voxels (full-volume mask). The lung mask loses them, so inserters that run later
    (nodules, effusion, nodes) see the raised base; the cached sites are dropped for the same reason.
    """
    lung = anatomy.lung == code
    present = lung.any(axis=2)
    lowest = np.argmax(lung, axis=2)
    k = np.arange(anatomy.hu.shape[2])
    lifted = lung & present[:, :, None] & (k[None, None, :] < lowest[:, :, None] + lift_mm / anatomy.spacing[2])
    anatomy.hu[lifted] = rng.uniform(45.0, 65.0) + 8.0 * rng.standard_normal(int(lifted.sum())).astype(np.float32)
    anatomy.lung[lifted] = 0
    sites.forget()
    return lifted


def _collapse_region(anatomy: Anatomy, sites: _Sites, code: int, zone: str, fill: float,
                     rng: np.random.Generator) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """A lobe collapsing towards the mediastinum: the ``fill`` fraction of the zone nearest its medial corner.

    Lower zone: the posteromedial (paravertebral) corner, as a collapsed lower lobe lies; upper zone: the
    anteromedial corner, as a collapsed upper lobe lies against the mediastinum. Distances are scaled
    so the region is taller than wide: a wedge along the mediastinum, not a ball.
    """
    box = _zone_box(anatomy, sites, code, zone)
    if box is None:
        return None
    region, allowed = box
    coords = np.argwhere(allowed)
    lateral = _lateral_sign(code)
    origin = np.array([r.start for r in region], dtype=np.float64)
    medial = lateral * (coords[:, 0] + origin[0] - anatomy.midline_i)
    depth = coords[:, 1] if zone == "lower" else -coords[:, 1]  # posterior (low j) for lower lobes
    corner_score = (medial - medial.min()) / max(1.0, np.ptp(medial)) + (depth - depth.min()) / max(1.0, np.ptp(depth))
    k_mid = np.median(coords[:, 2])
    corner = coords[np.argmin(corner_score + 0.5 * np.abs(coords[:, 2] - k_mid) / max(1.0, np.ptp(coords[:, 2])))]
    dx, dy, dz = _offsets_mm(region, corner.astype(np.float64) + origin, np.asarray(anatomy.spacing))
    distance = np.sqrt(dx**2 + dy**2 + (dz / 2.5) ** 2)
    noise = smooth_noise(allowed.shape, tuple(max(1.5, 15.0 / s) for s in anatomy.spacing), rng)
    score = -distance / 40.0 + 0.15 * noise
    threshold = float(np.quantile(score[allowed], 1.0 - fill))
    alpha = np.clip((score - threshold) / 0.05 + 0.5, 0.0, 1.0).astype(np.float32)
    return region, np.where(allowed, alpha, 0.0).astype(np.float32)


def _band_region(anatomy: Anatomy, sites: _Sites, code: int, zone: str,
                 rng: np.random.Generator) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Plate-like atelectasis: an oblique band 12-20 mm thick and 6-11 cm across, centred in the zone."""
    spacing = np.asarray(anatomy.spacing)
    coords = sites.deep_lung_zone(code, zone, min_depth_mm=10.0)
    if not len(coords):
        return None
    centre = _pick(coords, rng)
    thick, radius = rng.uniform(12.0, 20.0), rng.uniform(30.0, 55.0)
    tilt, azimuth = np.deg2rad(rng.uniform(20.0, 60.0)), rng.uniform(0.0, 2.0 * np.pi)
    normal = np.array([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    region, offsets = _box(centre, radius + thick, spacing, anatomy.hu.shape)
    dx, dy, dz = _grid(offsets)
    along = dx * normal[0] + dy * normal[1] + dz * normal[2]
    across = np.sqrt(np.maximum(dx**2 + dy**2 + dz**2 - along**2, 0.0))
    alpha = _soft(thick / 2.0 - np.abs(along), 0.7 * spacing.min()) * _soft(radius - across, spacing.min())
    return region, np.where(anatomy.lung[region] == code, alpha, 0.0).astype(np.float32)


def _insert_atelectasis(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Lobar/segmental collapse (a medial wedge, 12-25 % of the zone) or plate-like bands, with volume loss.

    Volume loss is what tells collapse from consolidation on CT: the lower-zone kinds raise that
    lung's hemidiaphragm by 15-30 mm (collapse) or 8-15 mm (bands). Collapsed lung is denser
    (20-60 HU) and carries no air bronchograms here.
    """
    spacing = np.asarray(anatomy.spacing)
    value = rng.uniform(20.0, 60.0)
    kind = "collapse" if rng.random() < 0.7 else "band"
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions: list[Lesion] = []
    for code in _sides_for(laterality):
        lift_mm = 0.0
        if zone == "lower":
            lift_mm = rng.uniform(15.0, 30.0) if kind == "collapse" else rng.uniform(8.0, 15.0)
            _elevate_hemidiaphragm(anatomy, sites, code, lift_mm, rng)
        shaped = (_collapse_region(anatomy, sites, code, zone, rng.uniform(0.12, 0.25), rng) if kind == "collapse"
                  else _band_region(anatomy, sites, code, zone, rng))
        if shaped is None:
            continue
        region, alpha = shaped
        texture = value + 10.0 * rng.standard_normal(alpha.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, alpha, texture, alpha > 0)
        volume = float(mask.sum()) * voxel_ml
        if volume < 2.5:
            continue
        idx = np.argwhere(mask) + np.array([r.start for r in region])
        centre = idx.mean(axis=0)
        size = float(((idx.max(axis=0) - idx.min(axis=0) + 1) * spacing).max())
        lesions.append(
            Lesion("", "atelectasis", SIDE_NAMES[code], zone, size, float(value),
                   tuple(float(c) for c in centre), volume,  # type: ignore[arg-type]
                   {"kind": kind, "volume_loss_mm": round(float(lift_mm), 1)}, region, mask)
        )
    return lesions


def _insert_nodes(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Enlarged hilar or paratracheal lymph nodes (3-5 of 28-48 mm, 40-70 HU) bulging into the medial lung.

    Centres sit on the lung's medial border (the tenth of the lung closest to the midline, within
    ~1.5 voxels of non-lung) at hilar levels (lower zone: 30-55 % of the lung's height) or paratracheal
    levels (upper zone: 55-85 %), and a placement is accepted when 30-70 % of the node lies in lung.
    Why: a node that only replaces mediastinal fat differs from the heart and vessels beside it by a
    few tens of HU, invisible after the training window and resize; one bulging into the lung shows
    its convex contour against air, as enlarged hilar nodes do on real CT. Painting is limited to lung
    and mediastinal fat, so the node never spills into the heart, bone or abdomen.
    """
    spacing = np.asarray(anatomy.spacing)
    paintable = (anatomy.lung > 0) | anatomy.mediastinum
    value = rng.uniform(40.0, 70.0)
    count = int(rng.integers(3, 6))
    sides = _sides_for(laterality)
    band = (0.55, 0.85) if zone == "upper" else (0.3, 0.55)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions: list[Lesion] = []
    for n in range(count):
        code = sides[n % len(sides)]
        coords, depth = sites.lung(code), sites.depth_mm(code)
        if len(coords) < 40:
            continue
        k_lo, k_hi = float(coords[:, 2].min()), float(coords[:, 2].max())
        height = (coords[:, 2] - k_lo) / max(1.0, k_hi - k_lo)
        medial_distance = np.abs(coords[:, 0] - anatomy.midline_i)
        in_band = (height >= band[0]) & (height <= band[1])
        if not in_band.any():
            continue
        medial = medial_distance <= np.quantile(medial_distance[in_band], 0.1)
        cands = coords[in_band & medial & (depth <= 1.5 * float(spacing.max()))]
        if not len(cands):
            cands = coords[in_band & medial]
        diameter = rng.uniform(28.0, 48.0)
        radii = diameter / 2.0 * rng.uniform(0.85, 1.15, size=3)
        best = None
        for _ in range(20):
            centre = _pick(cands, rng)
            region, (dx, dy, dz), rho = _ellipsoid(centre, radii, spacing, anatomy.hu.shape)
            alpha = _soft((1.0 - rho) * radii.mean(), 0.7 * spacing.min())
            body = alpha >= 0.5
            if not body.any():
                continue
            in_lung = float(_aerated(anatomy, region)[body].mean())
            score = -abs(in_lung - 0.5)
            if best is None or score > best[0]:
                best = (score, centre, region, alpha)
            if 0.3 <= in_lung <= 0.7:
                break
        if best is None or best[0] < -0.35:
            continue
        _, centre, region, alpha = best
        texture = value + 6.0 * rng.standard_normal(alpha.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, alpha, texture, paintable[region])
        side = SIDE_NAMES[code]
        station = ("right paratracheal" if side == "right" else "aortopulmonary window") if zone == "upper" \
            else f"{side} hilar"
        lesions.append(
            Lesion("", "lymphadenopathy", side, zone, float(2.0 * radii.min()),
                   float(value), tuple(float(c) for c in centre), float(mask.sum()) * voxel_ml,  # type: ignore[arg-type]
                   {"station": station}, region, mask)
        )
    return lesions


def _insert_emphysema(anatomy: Anatomy, sites: _Sites, rng: np.random.Generator, laterality: str, zone: str) -> list[Lesion]:
    """Patchy confluent low attenuation (-995..-965 HU), graded towards one zone, sometimes with bullae.

    Patches are thresholded smooth noise biased by height in the lung, so they cluster in the apices
    (centrilobular, upper zone) or the bases (panlobular, lower zone) and fade out instead of stopping
    at a hard zone boundary; they cover roughly 30-60% of the chosen zone.
    """
    spacing = np.asarray(anatomy.spacing)
    value = rng.uniform(-995.0, -965.0)
    fraction = rng.uniform(0.3, 0.6)
    bullae = rng.random() < 0.35
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions: list[Lesion] = []
    for code in _sides_for(laterality):
        coords = sites.lung(code)
        if len(coords) < 40:
            continue
        lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        allowed = anatomy.lung[region] == code
        height = (np.arange(lo[2], hi[2]) - lo[2]) / max(1.0, float(hi[2] - lo[2] - 1))
        bias = (height - 0.5) if zone == "upper" else (0.5 - height)
        score = smooth_noise(allowed.shape, tuple(max(1.5, 22.0 / s) for s in spacing), rng) + 3.0 * bias[None, None, :]
        threshold = float(np.quantile(score[allowed], 1.0 - fraction / 2.0))
        alpha = np.clip((score - threshold) / 0.35 + 0.5, 0.0, 1.0).astype(np.float32)
        if bullae:
            in_zone = sites.lung_zone(code, zone)
            for _ in range(int(rng.integers(1, 3))):
                c = in_zone[int(rng.integers(len(in_zone)))] - lo
                r = rng.uniform(12.0, 25.0)
                offs = [(np.arange(n, dtype=np.float32) - ci) * sp for n, ci, sp in zip(allowed.shape, c, spacing)]
                dist = np.sqrt(offs[0][:, None, None] ** 2 + offs[1][None, :, None] ** 2 + offs[2][None, None, :] ** 2)
                alpha = np.maximum(alpha, _soft(r - dist, spacing.min()))
        texture = value + 6.0 * rng.standard_normal(alpha.shape).astype(np.float32)
        mask = _paint(anatomy.hu, region, alpha, texture, allowed)
        volume = float(mask.sum()) * voxel_ml
        if volume < 10.0:
            continue
        centre = np.argwhere(mask).mean(axis=0) + lo
        severity = "mild" if fraction < 0.4 else ("moderate" if fraction < 0.5 else "severe")
        lesions.append(
            Lesion("", "emphysema", SIDE_NAMES[code], sites.zone_of(code, centre[2]), float(fraction * 100.0), float(value),
                   tuple(float(c) for c in centre), volume,  # type: ignore[arg-type]
                   {"severity": severity, "bullae": bool(bullae), "fraction": round(float(fraction), 3),
                    "predominance": zone}, region, mask)
        )
    return lesions


# Insertion order: parenchyma first, then focal opacities, fluid (dependent, on top), nodes last.
_INSERTERS: dict[str, tuple[InsertFn, tuple[float, float, float], float]] = {
    # finding: (function, P(left, right, bilateral), P(upper zone))
    "emphysema": (_insert_emphysema, (0.2, 0.2, 0.6), 0.8),
    "consolidation": (_insert_consolidation, (0.4, 0.4, 0.2), 0.4),
    "atelectasis": (_insert_atelectasis, (0.35, 0.35, 0.3), 0.2),
    "nodule": (_insert_nodules, (0.4, 0.4, 0.2), 0.5),
    "pleural effusion": (_insert_effusion, (0.35, 0.35, 0.3), 0.0),
    "lymphadenopathy": (_insert_nodes, (0.35, 0.35, 0.3), 0.5),
}


def summarise(lesions: list[Lesion]) -> list[FindingSummary]:
    """One :class:`FindingSummary` per present finding, in :data:`FINDINGS` order."""
    out: list[FindingSummary] = []
    for finding in FINDINGS:
        group = [x for x in lesions if x.finding == finding]
        if not group:
            continue
        sides = {x.side for x in group}
        largest = max(group, key=lambda x: x.size_mm)
        attrs = dict(largest.attrs)
        for key in ("mass", "spiculated", "air_bronchograms", "bullae"):
            if any(x.attrs.get(key) for x in group):
                attrs[key] = True
        if finding == "pleural effusion" and len(group) > 1:
            attrs["larger_side"] = largest.side
        if finding == "lymphadenopathy":
            attrs["stations"] = sorted({x.attrs["station"] for x in group})
        out.append(
            FindingSummary(
                finding=finding,
                laterality="bilateral" if len(sides) > 1 else next(iter(sides)),
                zone=largest.zone,
                size_mm=float(largest.size_mm),
                count=len(group),
                attrs=attrs,
            )
        )
    return out


def insert_findings(
    anatomy: Anatomy, rng: np.random.Generator, id_prefix: str, probability: float = DEFAULT_PROBABILITY
) -> tuple[list[Lesion], list[FindingSummary]]:
    """Draw which findings are present (independently), insert them into ``anatomy.hu`` in place.

    The presence/laterality/zone draws happen for all six findings first, in a fixed order, so the
    label distribution does not depend on how many random numbers an inserter happened to use. A finding
    whose inserter finds no room (e.g. no lung in a tiny crop) is simply absent from the labels.
    """
    plans: dict[str, tuple[bool, str, str]] = {}
    for finding in FINDINGS:
        _, lat_p, upper_p = _INSERTERS[finding]
        present = rng.random() < probability
        laterality = str(rng.choice(["left", "right", "bilateral"], p=lat_p))
        zone = "upper" if rng.random() < upper_p else "lower"
        plans[finding] = (present, laterality, zone)
    sites = _Sites(anatomy)
    lesions: list[Lesion] = []
    for finding, (fn, _, _) in _INSERTERS.items():
        present, laterality, zone = plans[finding]
        if present:
            lesions.extend(fn(anatomy, sites, rng, laterality, zone))
    for n, lesion in enumerate(lesions):
        lesion.lesion_id = f"{id_prefix}-L{n:02d}"
    return lesions, summarise(lesions)
