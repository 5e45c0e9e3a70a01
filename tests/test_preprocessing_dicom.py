"""DICOM series loading on the shared real-data fixtures (skipped when ../shared/data is absent).

Modified DICOM copies are written only to pytest's tmp_path, never into the repository.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from config.settings import PreprocessingSettings
from model_export.preprocessing import (
    MixedSeriesError,
    NoPixelDataError,
    NotDicomError,
    PixelDecodeError,
    TooFewSlicesError,
    Volume,
    VolumeError,
    load_dicom_series,
    load_volume,
    preprocess_path,
    preprocess_volume,
    read_dicom_slice,
    reorient_to_ras,
)

A0001 = "Lung_Dx-A0001_series2_5mm"
A0002 = "Lung_Dx-A0002_series2_B70f"


@pytest.fixture(scope="session")
def a0001_dir(lung_ct_dir: Path) -> Path:
    return lung_ct_dir / A0001


@pytest.fixture(scope="session")
def a0001(a0001_dir: Path) -> Volume:
    return load_dicom_series(a0001_dir)


@pytest.fixture(scope="session")
def ge_head_dir(shared_data: Path) -> Path:
    return shared_data / "ct" / "dcm_qa_ct-ge-head"


@pytest.fixture(scope="session")
def nema_dir(shared_data: Path) -> Path:
    return shared_data / "ct" / "nema-wg04-ct"


def _z_of(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def _hu_of(path: Path) -> np.ndarray:
    """Reference HU straight from pydicom, [rows, columns]."""
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


# --- ordering, HU, geometry -------------------------------------------------------------------------


def test_lung_series_sorted_by_position_not_instance_number(a0001_dir: Path, a0001: Volume) -> None:
    files = sorted(a0001_dir.glob("*.dcm"))
    assert a0001.shape == (512, 512, 64)
    # InstanceNumber 1 is the top slice (z=-124); sorting along +normal (+z here) puts it last.
    by_z = sorted(files, key=_z_of)
    for k in (0, 1, 31, 63):
        np.testing.assert_array_equal(a0001.array[:, :, k], _hu_of(by_z[k]).T)
    # Affine: LPS IPP (-228.04, -93.06, -439) -> RAS (228.04, 93.06, -439); +5 mm per slice along S.
    np.testing.assert_allclose(a0001.affine[:3, 3], [228.036842, 93.0631599, -439.0], atol=1e-6)
    np.testing.assert_allclose(np.diag(a0001.affine)[:3], [-0.841796875, -0.841796875, 5.0])
    assert a0001.meta["modality"] == "CT" and a0001.meta["n_slices"] == 64
    assert not a0001.meta["slice_resampled"] and not a0001.meta["gantry_tilt_corrected"]


def test_shuffled_file_list_gives_identical_volume(a0001_dir: Path, a0001: Volume) -> None:
    files = sorted(a0001_dir.glob("*.dcm"))
    random.Random(7).shuffle(files)
    shuffled = load_dicom_series(files)
    np.testing.assert_array_equal(shuffled.array, a0001.array)
    np.testing.assert_array_equal(shuffled.affine, a0001.affine)


def test_hounsfield_units(a0001: Volume, lung_ct_dir: Path) -> None:
    # Rescale intercept -1024 is applied: stored 0 -> -1024 HU; air in the corners is about -1000.
    assert a0001.array.min() == -1024.0
    other = load_dicom_series(lung_ct_dir / A0002)
    for volume in (a0001, other):
        mid = volume.array[:, :, volume.shape[2] // 2]
        for corner in (mid[:8, :8], mid[:8, -8:], mid[-8:, :8], mid[-8:, -8:]):
            assert -1030.0 <= float(corner.mean()) <= -950.0
        centre = volume.array[200:312, 200:312, :]
        assert centre.max() > 0  # tissue/bone present, not all air


def test_missing_slice_is_filled_by_interpolation(a0001_dir: Path, a0001: Volume) -> None:
    by_z = sorted(a0001_dir.glob("*.dcm"), key=_z_of)
    gappy = load_dicom_series(by_z[:20] + by_z[21:])  # one 10 mm gap among 5 mm gaps
    assert gappy.meta["slice_resampled"] and gappy.shape == a0001.shape
    np.testing.assert_allclose(gappy.affine, a0001.affine, atol=1e-9)
    np.testing.assert_allclose(gappy.array[:, :, :20], a0001.array[:, :, :20], atol=1e-3)
    np.testing.assert_allclose(gappy.array[:, :, 21:], a0001.array[:, :, 21:], atol=1e-3)
    expected = (a0001.array[:, :, 19] + a0001.array[:, :, 21]) / 2
    np.testing.assert_allclose(gappy.array[:, :, 20], expected, atol=1e-3)


def test_gantry_tilt_and_uneven_spacing(ge_head_dir: Path) -> None:
    files = sorted(ge_head_dir.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    positions = np.array([[float(x) for x in h.ImagePositionPatient] for h in headers])
    iop = np.array([float(x) for x in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    along = np.sort(positions @ normal)

    volume = load_volume(ge_head_dir)
    meta = volume.meta
    assert meta["gantry_tilt_corrected"] and meta["slice_resampled"]
    assert meta["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.05)
    # Uniform orthogonal grid: affine columns orthogonal, in-plane spacing kept, slice spacing = median gap.
    columns = volume.affine[:3, :3]
    gram = columns.T @ columns
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-9)
    sx, sy, sz = volume.spacing
    assert sx == pytest.approx(0.4882812) and sy == pytest.approx(0.4882812)
    assert sz == pytest.approx(np.median(np.diff(along)), rel=0.01)
    # Physical extent along the normal equals that of the real slices (about 144 mm, not 28 * 4 mm).
    extent = along[-1] - along[0]
    assert extent == pytest.approx(144.1, abs=0.2)
    assert (volume.shape[2] - 1) * sz == pytest.approx(extent, abs=1e-4)  # IOP is stored to 7 digits
    # The enlarged in-plane canvas covers the ~99-row drift of the tilted slices.
    assert volume.shape[0] == 512 and volume.shape[1] > 512 + 90

    # Every real slice's first pixel maps to i = 0, a whole-canvas row, and its true slice position.
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    inverse = np.linalg.inv(volume.affine)
    ijk = np.array([(inverse @ np.r_[lps_to_ras @ p, 1.0])[:3] for p in positions])
    np.testing.assert_allclose(ijk[:, 0], 0.0, atol=1e-4)
    np.testing.assert_allclose(np.sort(ijk[:, 2]), (along - along[0]) / sz, atol=1e-4)
    assert ijk[:, 1].min() >= -1e-4 and ijk[:, 1].max() <= volume.shape[1] - 512 + 1e-4
    # The lowest slice is reproduced exactly in plane 0 (it defines the grid), the top one in the last.
    low, high = int(np.argmin(positions @ normal)), int(np.argmax(positions @ normal))
    row0 = int(round(ijk[low, 1]))
    np.testing.assert_array_equal(volume.array[:, row0 : row0 + 512, 0], _hu_of(files[low]).T)
    row1 = int(np.floor(ijk[high, 1]))
    top = volume.array[:, row1 : row1 + 512, -1]
    reference = _hu_of(files[high]).T
    assert np.corrcoef(top[:, 10:-10].ravel(), reference[:, 10:-10].ravel())[0, 1] > 0.95


def test_ge_head_preprocesses(ge_head_dir: Path) -> None:
    out = preprocess_path(ge_head_dir, PreprocessingSettings(target_shape=(32, 64, 64)))
    assert out.shape == (1, 32, 64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


# --- transfer syntaxes -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["CT1", "CT2"])
def test_lossless_transfer_syntaxes_decode_bit_exactly(nema_dir: Path, case: str) -> None:
    reference = read_dicom_slice(nema_dir / f"{case}_UNC.dcm").hu()
    for syntax in ("J2KR", "RLE"):
        np.testing.assert_array_equal(read_dicom_slice(nema_dir / f"{case}_{syntax}.dcm").hu(), reference)
    one = load_dicom_series([nema_dir / f"{case}_J2KR.dcm"])  # a one-file list is a one-slice volume
    assert one.shape == (512, 512, 1)
    np.testing.assert_array_equal(one.array[:, :, 0], reference.T)
    lossy = read_dicom_slice(nema_dir / f"{case}_J2KI.dcm").hu()
    assert 0 < np.abs(lossy - reference).max() <= 500
    # JPEG-LS / JPEG lossless decode bit-exactly if a plugin is installed, else fail naming the syntax.
    for syntax, name in (("JLSL", "JPEG-LS"), ("JPLL", "JPEG Lossless")):
        try:
            decoded = read_dicom_slice(nema_dir / f"{case}_{syntax}.dcm").hu()
        except PixelDecodeError as exc:
            assert name in str(exc) and f"{case}_{syntax}.dcm" in str(exc)
        else:
            np.testing.assert_array_equal(decoded, reference)


def test_duplicate_positions_keep_one_slice_and_warn(nema_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = [nema_dir / "CT1_J2KR.dcm", nema_dir / "CT1_UNC.dcm"]  # same series, same position
    with caplog.at_level(logging.WARNING):
        volume = load_dicom_series(files)
    assert volume.shape == (512, 512, 1) and volume.meta["duplicates_dropped"] == 1
    assert "share a position" in caplog.text
    assert volume.meta == load_dicom_series(files[::-1]).meta  # the kept file does not depend on order


def test_blank_uids_load_with_warning(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = shared_data / "ct" / "totalsegmentator-j2k"
    with caplog.at_level(logging.WARNING):
        volume = load_volume(folder)
    assert volume.shape == (512, 512, 20)
    assert volume.meta["series_instance_uid"] is None
    assert volume.meta["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]
    assert volume.spacing[2] == pytest.approx(2.0)
    assert volume.array.min() >= -1024.0 and volume.array.max() > 500.0
    assert "SeriesInstanceUID is blank" in caplog.text
    assert volume.meta["files_skipped"] == 2  # README.md and LICENSE


# --- bad inputs ---------------------------------------------------------------------------------------


def test_missing_and_non_dicom_inputs(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"nowhere.*does not exist"):
        load_dicom_series(tmp_path / "nowhere")
    with pytest.raises(VolumeError, match=r"nowhere.*does not exist"):
        load_volume(tmp_path / "nowhere")
    fake = tmp_path / "fake.dcm"
    fake.write_text("this is not a DICOM file\n")
    with pytest.raises(NotDicomError, match=r"fake\.dcm.*not a DICOM file"):
        load_volume(fake)
    with pytest.raises(NotDicomError, match=r"fake\.dcm"):
        load_dicom_series([fake])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match=r"empty.*no DICOM image files.*empty"):
        load_volume(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(VolumeError, match=r"no DICOM image files.*notes\.txt"):
        load_volume(empty)
    with pytest.raises(VolumeError, match="empty list"):
        load_dicom_series([])


def test_mixed_series_are_rejected(lung_ct_dir: Path) -> None:
    series2 = sorted((lung_ct_dir / A0001).glob("*.dcm"))[:3]
    series3 = sorted((lung_ct_dir / "Lung_Dx-A0001_series3_5mm").glob("*.dcm"))[:2]
    with pytest.raises(MixedSeriesError, match=r"SeriesInstanceUID.*3 file\(s\).*2 file\(s\)"):
        load_dicom_series(series2 + series3)
    with pytest.raises(VolumeError, match=r"no DICOM image files.*\d+ subfolder\(s\): pass one series folder"):
        load_volume(lung_ct_dir)


def test_folder_mixing_two_series_is_rejected(lung_ct_dir: Path, tmp_path: Path) -> None:
    for folder in (A0001, "Lung_Dx-A0001_series3_5mm"):
        for path in sorted((lung_ct_dir / folder).glob("*.dcm"))[:2]:
            (tmp_path / f"{folder}-{path.name}").symlink_to(path)
    with pytest.raises(MixedSeriesError, match=rf"{tmp_path.name}.*different SeriesInstanceUIDs"):
        load_volume(tmp_path)

def test_mixed_orientation_size_and_missing_pixels(a0001_dir: Path, tmp_path: Path) -> None:
    files = sorted(a0001_dir.glob("*.dcm"))[:3]

    def modified(name: str, change: Callable[[pydicom.Dataset], None]) -> Path:
        ds = pydicom.dcmread(files[2])
        change(ds)
        out = tmp_path / name
        ds.save_as(out)
        return out

    tilted = modified("tilted.dcm", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.96, -0.28]))
    with pytest.raises(MixedSeriesError, match=r"orientations differ.*tilted\.dcm"):
        load_dicom_series(files[:2] + [tilted])
    small = modified("small.dcm", lambda ds: setattr(ds, "Rows", 256))
    with pytest.raises(MixedSeriesError, match=r"matrix size.*512x512.*256x512"):
        load_dicom_series(files[:2] + [small])
    spaced = modified("spaced.dcm", lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]))
    with pytest.raises(MixedSeriesError, match="pixel spacings differ"):
        load_dicom_series(files[:2] + [spaced])
    no_pixels = modified("nopix.dcm", lambda ds: delattr(ds, "PixelData"))
    with pytest.raises(NoPixelDataError, match=r"nopix\.dcm.*no pixel data"):
        load_dicom_series(files[:2] + [no_pixels])
    no_position = modified("nopos.dcm", lambda ds: delattr(ds, "ImagePositionPatient"))
    with pytest.raises(VolumeError, match=r"nopos\.dcm.*ImagePositionPatient"):
        load_dicom_series([no_position])


def test_too_few_slices(a0001_dir: Path) -> None:
    files = sorted(a0001_dir.glob("*.dcm"))[:3]
    with pytest.raises(TooFewSlicesError, match=r"only 3 distinct slice.*>= 8"):
        load_dicom_series(files, min_slices=8)
    with pytest.raises(TooFewSlicesError, match="fewer than 8"):
        preprocess_path(files, PreprocessingSettings())


def test_non_ct_modality_is_recorded(a0001_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for path in sorted(a0001_dir.glob("*.dcm"))[:2]:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(tmp_path / path.name)
    with caplog.at_level(logging.WARNING):
        volume = load_volume(tmp_path)
    assert volume.meta["modality"] == "MR" and "not CT" in caplog.text


# --- end to end ---------------------------------------------------------------------------------------


def test_preprocess_lung_series(a0001_dir: Path, a0001: Volume) -> None:
    spec = PreprocessingSettings()
    out = preprocess_path(a0001_dir, spec)
    assert out.shape == (1, *spec.target_shape) and out.dtype == np.float32
    assert out.min() == 0.0 and 0.9 < out.max() <= 1.0
    before = a0001.array.copy()
    np.testing.assert_array_equal(out, preprocess_volume(a0001, spec))
    np.testing.assert_array_equal(a0001.array, before)  # the input volume is never modified
    # Same as preprocessing the RAS-reoriented volume (reorientation is exact and idempotent).
    np.testing.assert_array_equal(out, preprocess_volume(reorient_to_ras(a0001), spec))
