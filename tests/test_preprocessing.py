"""Preprocessing recipe, geometry and non-DICOM loaders (synthetic data; no shared fixtures needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from config.settings import PreprocessingSettings
from model_export.preprocessing import (
    DimensionalityError,
    TooFewSlicesError,
    Volume,
    VolumeError,
    axis_codes,
    crop_to_foreground,
    describe_spec,
    load_nifti,
    load_volume,
    preprocess_path,
    preprocess_volume,
    reorient_to_ras,
    resample_to_spacing,
    resize_linear,
    window_to_range,
)
from model_export.preprocessing.slice_assembly import assemble_stack

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_SPEC = PreprocessingSettings(target_shape=(16, 24, 32), min_slices=8)


def _phantom(shape: tuple[int, int, int] = (40, 36, 30), seed: int = 0) -> np.ndarray:
    """Air with an off-centre noisy ellipsoid 'body' (float32 HU), asymmetric so flips are visible."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (grid[0] - 0.1) ** 2 / 0.5 + (grid[1] + 0.05) ** 2 / 0.6 + grid[2] ** 2 / 0.7 < 1
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[body] = rng.normal(40.0, 30.0, body.sum())
    return array


# --- the module stays torch-free -------------------------------------------------------------------


def test_package_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['monai'] = None\n"
        "import model_export.preprocessing as p\n"
        "assert p.preprocess_volume and 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for source in (REPO_ROOT / "model_export" / "preprocessing").glob("*.py"):
        text = source.read_text()
        assert "import torch" not in text and "from torch" not in text, source


# --- Volume ----------------------------------------------------------------------------------------


def test_volume_properties_and_validation() -> None:
    affine = np.diag([-0.7, -0.7, 5.0, 1.0])
    volume = Volume(np.zeros((4, 5, 6), dtype=np.int16), affine, "x")
    assert volume.array.dtype == np.float32
    assert volume.shape == (4, 5, 6)
    assert volume.spacing == pytest.approx((0.7, 0.7, 5.0))
    with pytest.raises(DimensionalityError, match="expected a 3D volume"):
        Volume(np.zeros((4, 5)), np.eye(4), "flat")
    with pytest.raises(VolumeError, match="singular"):
        Volume(np.zeros((4, 5, 6)), np.diag([1.0, 0.0, 1.0, 1.0]), "bad-affine")


# --- loaders (npy / NIfTI / dispatch) ---------------------------------------------------------------


def test_load_volume_npy_and_bad_inputs(tmp_path: Path) -> None:
    good = tmp_path / "v.npy"
    np.save(good, np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    volume = load_volume(good)
    assert volume.shape == (2, 3, 4) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.affine, np.eye(4))

    squeezable = tmp_path / "v4.npy"
    np.save(squeezable, np.zeros((2, 3, 4, 1)))
    assert load_volume(squeezable).shape == (2, 3, 4)

    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((5, 5)))
    with pytest.raises(VolumeError, match=r"flat\.npy.*3D.*\(5, 5\)"):
        load_volume(flat)

    with pytest.raises(VolumeError, match=r"nope\.nii\.gz.*does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VolumeError, match=r"notes\.txt.*unsupported"):
        load_volume(text)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match=r"broken\.nii\.gz.*cannot read as NIfTI"):
        load_volume(broken)


def test_load_nifti_dimensionality(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), np.eye(4)), tmp_path / "one.nii.gz")
    assert load_nifti(tmp_path / "one.nii.gz").shape == (4, 5, 6)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(DimensionalityError, match=r"two\.nii\.gz.*\(4, 5, 6, 2\)"):
        load_nifti(tmp_path / "two.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), tmp_path / "flat.nii")
    with pytest.raises(DimensionalityError):
        load_volume(tmp_path / "flat.nii")


def _flipped_copy(data: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same physical content stored with ``axes`` reversed (affine adjusted to match)."""
    flipped_affine = affine.copy()
    for axis in axes:
        flipped_affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
        flipped_affine[:3, axis] *= -1
    return np.flip(data, axis=axes).copy(), flipped_affine


def test_reorient_lps_las_and_permuted_nifti_give_identical_ras(tmp_path: Path) -> None:
    ras_data = _phantom((20, 18, 12))
    ras_affine = np.array([[0.8, 0, 0, -10.0], [0, 0.9, 0, 20.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    lps_data, lps_affine = _flipped_copy(ras_data, ras_affine, (0, 1))
    las_data, las_affine = _flipped_copy(ras_data, ras_affine, (0,))
    sar_data, sar_affine = ras_data.transpose(2, 1, 0).copy(), ras_affine[:, [2, 1, 0, 3]]
    results = {}
    for name, data, affine in [("ras", ras_data, ras_affine), ("lps", lps_data, lps_affine),
                               ("las", las_data, las_affine), ("sar", sar_data, sar_affine)]:
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        loaded = load_nifti(path)
        assert "".join(axis_codes(loaded.affine)) == name.upper()
        results[name] = reorient_to_ras(loaded)
    for name, volume in results.items():
        assert axis_codes(volume.affine) == ("R", "A", "S"), name
        np.testing.assert_array_equal(volume.array, ras_data, err_msg=name)
        np.testing.assert_allclose(volume.affine, ras_affine, atol=1e-4, err_msg=name)
    outputs = [preprocess_path(tmp_path / f"{name}.nii.gz", SMALL_SPEC) for name in results]
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])


def test_reorient_keeps_world_positions() -> None:
    data = _phantom((10, 11, 12))
    affine = np.array([[0, 0, -2.0, 5], [-1.0, 0, 0, 7], [0, 3.0, 0, -9], [0, 0, 0, 1]])  # P? I S... permuted + flips
    volume = Volume(data, affine, "perm")
    ras = reorient_to_ras(volume)
    assert axis_codes(ras.affine) == ("R", "A", "S")
    # Every voxel keeps its world position: compare world -> value maps at a few voxels.
    inv = np.linalg.inv(ras.affine)
    for ijk in [(0, 0, 0), (3, 4, 5), (9, 10, 11)]:
        world = affine @ np.r_[ijk, 1.0]
        new_ijk = np.rint(inv @ world)[:3].astype(int)
        assert ras.array[tuple(new_ijk)] == data[ijk]


# --- resampling -------------------------------------------------------------------------------------


def test_resize_linear_preserves_constants_and_ramps() -> None:
    constant = np.full((50, 40, 30), 7.5, dtype=np.float32)
    np.testing.assert_allclose(resize_linear(constant, (16, 24, 64)), 7.5, rtol=1e-6)
    # A linear ramp along axis 0 stays exactly linear (pixel-centre mapping, block averaging included).
    ramp = np.broadcast_to(np.arange(300, dtype=np.float32)[:, None, None], (300, 4, 4))
    out = resize_linear(ramp, (96, 4, 4))
    expected = (np.arange(96) + 0.5) * 300 / 96 - 0.5
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-3)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    same = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(resize_linear(same, (5, 6, 7)), same)


def test_resample_to_spacing_keeps_field_of_view() -> None:
    volume = Volume(_phantom((40, 36, 30)), np.diag([0.5, 0.5, 2.0, 1.0]), "v")
    out = resample_to_spacing(volume, (1.0, 1.0, 1.0))
    assert out.shape == (20, 18, 60)
    assert out.spacing == pytest.approx((1.0, 1.0, 1.0))

    def fov(v: Volume) -> tuple[np.ndarray, np.ndarray]:  # outer voxel edges in world mm
        lo = v.affine @ np.r_[-0.5, -0.5, -0.5, 1]
        hi = v.affine @ np.r_[np.array(v.shape) - 0.5, 1]
        return lo[:3], hi[:3]

    for a, b in zip(fov(volume), fov(out)):
        np.testing.assert_allclose(a, b, atol=1e-9)


# --- recipe steps -----------------------------------------------------------------------------------


def test_window_to_range_maps_linearly_and_handles_nan() -> None:
    hu = np.array([[[-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0, np.nan]]], dtype=np.float32)
    out = window_to_range(hu, (-1000.0, 1000.0), (-1.0, 1.0))
    np.testing.assert_allclose(out.ravel(), [-1, -1, 0, 0.5, 1, 1, -1], atol=1e-6)
    assert out.dtype == np.float32


def test_crop_to_foreground() -> None:
    array = np.full((10, 12, 14), -1000.0, dtype=np.float32)
    array[2:5, 3:9, 4:6] = 50.0
    assert crop_to_foreground(array, -500.0).shape == (3, 6, 2)
    assert crop_to_foreground(np.full((4, 4, 4), -1000.0, np.float32), -500.0).shape == (4, 4, 4)


def test_preprocess_shape_dtype_range_and_determinism() -> None:
    volume = Volume(_phantom(), np.diag([-0.8, -0.8, 2.5, 1.0]), "phantom")
    spec = PreprocessingSettings(target_shape=(16, 24, 32), output_range=(-1.0, 1.0))
    out = preprocess_volume(volume, spec)
    assert out.shape == (1, 16, 24, 32) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.min() < -0.9 and out.max() > -0.2  # air and soft tissue both present
    np.testing.assert_array_equal(out, preprocess_volume(volume, spec))
    spaced = PreprocessingSettings(target_shape=(16, 24, 32), target_spacing_mm=(1.5, 1.5, 3.0), crop_foreground=False)
    assert preprocess_volume(volume, spaced).shape == (1, 16, 24, 32)


def test_preprocess_axis_convention_is_s_a_r() -> None:
    """A bright block at the right-anterior-superior corner lands at the end of W, H and D."""
    array = np.full((30, 30, 30), -1000.0, dtype=np.float32)
    array[24:, 24:, 24:] = 1000.0  # in LPS voxel order: high i = Left, high j = Posterior
    spec = PreprocessingSettings(target_shape=(10, 10, 10), crop_foreground=False)
    out_ras = preprocess_volume(Volume(array, np.eye(4), "ras"), spec)[0]
    assert out_ras[-1, -1, -1] == pytest.approx(1.0) and out_ras[0, 0, 0] == pytest.approx(0.0)
    out_lps = preprocess_volume(Volume(array, np.diag([-1.0, -1.0, 1.0, 1.0]), "lps"), spec)[0]
    assert out_lps[-1, 0, 0] == pytest.approx(1.0)  # superior, but posterior and left
    # Non-cubic: D follows the third (S) axis.
    out = preprocess_volume(Volume(np.zeros((20, 30, 40), np.float32), np.eye(4), "z"), spec)
    assert out.shape == (1, 10, 10, 10)


def test_preprocess_refuses_too_few_slices() -> None:
    thin = Volume(np.zeros((64, 64, 5), np.float32), np.eye(4), "scout.nii.gz")
    with pytest.raises(TooFewSlicesError, match=r"scout\.nii\.gz.*fewer than 8"):
        preprocess_volume(thin, SMALL_SPEC)


def test_describe_spec_is_json_and_complete() -> None:
    spec = PreprocessingSettings(target_spacing_mm=(1.0, 1.0, 2.0))
    description = json.loads(json.dumps(describe_spec(spec)))
    assert description["input_shape"] == [1, *spec.target_shape]
    assert description["target_shape"] == list(spec.target_shape)
    assert description["orientation"] == "RAS"
    assert description["hu_window"] == [-1000.0, 1000.0]
    assert description["target_spacing_mm"] == [1.0, 1.0, 2.0]
    for key in ("output_range", "crop_foreground", "foreground_threshold_hu", "interpolation", "axes", "recipe_version",
                "dicom_assembly"):
        assert key in description


# --- slice assembly (synthetic gantry tilt + uneven spacing with known ground truth) -----------------


def test_assemble_stack_tilted_uneven_matches_ground_truth() -> None:
    """Sample a smooth world-space function on tilted, unevenly spaced slices; the assembled untilted
    grid must reproduce the function at its own voxel positions (up to interpolation error)."""

    def field(points: np.ndarray) -> np.ndarray:  # smooth, varies along every axis (mm)
        x, y, z = points[..., 0], points[..., 1], points[..., 2]
        return (100 * np.sin(x / 15.0) + 80 * np.cos(y / 20.0) + 2.0 * z).astype(np.float32)

    tilt = np.radians(20.0)
    u = np.array([1.0, 0.0, 0.0])
    v = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(u, v)
    spacing = (1.0, 1.0)
    rows, cols = 40, 40
    steps_z = np.r_[np.full(6, 3.0), 1.0, np.full(6, 5.0)]  # table moves along world z (gantry tilted)
    positions = np.array([[-20.0, -20.0, 0.0]]) + np.c_[np.zeros((14, 2)), np.r_[0.0, np.cumsum(steps_z)]]
    r, c = np.mgrid[:rows, :cols]
    stack = np.stack([field(p + c[..., None] * u + r[..., None] * v) for p in positions])

    result = assemble_stack(stack, positions, u, v, spacing)
    assert result.info["gantry_tilt_corrected"] and result.info["slice_resampled"]
    assert result.info["gantry_tilt_deg"] == pytest.approx(20.0, abs=1e-6)
    affine = result.affine_lps
    gram = affine[:3, :3].T @ affine[:3, :3]
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-9)  # orthogonal (untilted) grid
    n_out = result.stack.shape[0]
    extent = (positions[-1] - positions[0]) @ normal
    assert (n_out - 1) * result.info["slice_spacing_mm"] == pytest.approx(extent)

    # Compare with the truth wherever the output voxel was covered by real slices.
    k, j, i = np.mgrid[: result.stack.shape[0], : result.stack.shape[1], : result.stack.shape[2]]
    world = (affine @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1))[:3].T
    truth = field(world).reshape(result.stack.shape)
    covered = result.stack > result.stack.min() + 1e-3
    inner = np.zeros_like(covered)
    inner[:, 2:-2, 2:-2] = covered[:, 2:-2, 2:-2] & covered[:, :-4, 2:-2] & covered[:, 4:, 2:-2]
    assert inner.sum() > 0.5 * rows * cols * n_out
    error = np.abs(result.stack - truth)[inner]
    assert error.max() < 6.0, error.max()  # field range ~ +-180 + z; linear interpolation error only
