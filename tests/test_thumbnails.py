"""Thumbnails: drawn in the radiological convention from the series' geometry (not its pixel order), windowed,
with the physical aspect ratio, as a thin-slab projection; cached once per key, redrawn when the series grows."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.report import thumbnails
from dicom_node.report.thumbnails import (
    ThumbnailCache,
    ThumbnailError,
    render_thumbnail,
    study_thumbnail,
)
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import InstanceRecord, StateStore, StudyState

AIR, TISSUE, BONE = -1000, 40, 700


def write_series(folder: Path, volume_hu: np.ndarray, *, row_direction=(1.0, 0.0, 0.0),
                 column_direction=(0.0, 1.0, 0.0), pixel_spacing=(1.0, 1.0), slice_mm: float = 2.5,
                 study_uid: str | None = None, series_uid: str | None = None, frame_uid: str = "1.2.3.4.5",
                 first_slice: int = 0) -> Path:
    """``volume_hu`` [slice, row, column] as CT files; slice k at z = (first_slice + k)·slice_mm (LPS, feet to
    head)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame = study_uid or generate_uid(), series_uid or generate_uid(), frame_uid
    for k, plane in enumerate(volume_hu, start=first_slice):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "THUMB-TEST", k + 1
        ds.ImageOrientationPatient = [*row_direction, *column_direction]
        ds.ImagePositionPatient = [0.0, 0.0, k * slice_mm]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_mm
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("L"), dtype=np.int32)


def marked_volume(rows: int = 64, columns: int = 64, slices: int = 5) -> np.ndarray:
    """Air with a bright block in the first rows and columns of the pixel array."""
    volume = np.full((slices, rows, columns), AIR, dtype=np.int16)
    volume[:, 4:20, 4:20] = BONE
    return volume


def quadrant_means(image: np.ndarray) -> dict[str, float]:
    h, w = image.shape
    return {"top-left": image[:h // 2, :w // 2].mean(), "top-right": image[:h // 2, w // 2:].mean(),
            "bottom-left": image[h // 2:, :w // 2].mean(), "bottom-right": image[h // 2:, w // 2:].mean()}


def brightest_quadrant(png: bytes) -> str:
    means = quadrant_means(pixels(png))
    return max(means, key=means.__getitem__)


def test_radiological_convention_comes_from_geometry_not_pixel_order(tmp_path: Path) -> None:
    # Standard axial DICOM: rows run to the patient's left, columns to posterior, so the first rows and columns
    # are the patient's right-anterior corner, which the radiological convention puts top-left.
    standard = write_series(tmp_path / "standard", marked_volume())
    assert brightest_quadrant(render_thumbnail(standard, size=64)) == "top-left"
    # The same anatomy stored flipped both ways (rows to the right, columns to anterior): the block now sits in the
    # last rows and columns of the pixel array, yet it is still the right-anterior corner and still drawn top-left.
    flipped = write_series(tmp_path / "flipped", marked_volume()[:, ::-1, ::-1], row_direction=(-1.0, 0.0, 0.0),
                           column_direction=(0.0, -1.0, 0.0))
    assert brightest_quadrant(render_thumbnail(flipped, size=64)) == "top-left"


def test_aspect_ratio_from_pixel_spacing_letterboxed_square(tmp_path: Path) -> None:
    # 64 columns × 0.5 mm = 32 mm wide, 64 rows × 1 mm = 64 mm tall: a tall image, black bars left and right.
    volume = np.full((3, 64, 64), TISSUE, dtype=np.int16)
    folder = write_series(tmp_path / "tall", volume, pixel_spacing=(1.0, 0.5))
    image = pixels(render_thumbnail(folder, window="mediastinum", size=96))
    assert image.shape == (96, 96)
    assert image[:, :20].max() == 0 and image[:, -20:].max() == 0, "letterbox bars"
    assert abs(image[:, 30:66].mean() - 127.5) < 3, "tissue at the mediastinal window's centre"
    filled = np.flatnonzero(image[48] > 0)
    assert 46 <= filled.size <= 50, f"width ≈ half the height, got {filled.size} px"


def test_windows(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "tissue", np.full((3, 32, 32), TISSUE, dtype=np.int16))
    lung = pixels(render_thumbnail(folder, window="lung", size=32))
    mediastinum = pixels(render_thumbnail(folder, window="mediastinum", size=32))
    # lung: level −600, width 1500 → 40 HU is (40 + 1350) / 1500 of the way up; mediastinum: level 40 → middle grey.
    assert abs(lung.mean() - 255 * 1390 / 1500) < 2
    assert abs(mediastinum.mean() - 127.5) < 2
    with pytest.raises(ValueError, match="unknown window"):
        render_thumbnail(folder, window="bone", size=32)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        render_thumbnail(folder, size=4)


def test_lung_window_is_a_thin_slab_mip_around_the_middle(tmp_path: Path) -> None:
    # 9 slices 2.5 mm apart: the 10 mm slab is 4 slices around the middle (indices 2..5). A vessel-like dot in
    # slice 3 (not the middle one) shows in the lung MIP; one 10 mm away from the middle (slice 8) does not.
    volume = np.full((9, 32, 32), AIR, dtype=np.int16)
    volume[3, 4:12, 4:12] = BONE
    volume[8, 20:28, 20:28] = BONE
    folder = write_series(tmp_path / "slab", volume, slice_mm=2.5)
    image = pixels(render_thumbnail(folder, window="lung", size=32))
    assert image[6:10, 6:10].min() > 200, "the nearby dot is in the MIP"
    air = round(255 * 350 / 1500)  # −1000 HU in the lung window (−1350 … 150)
    assert abs(image[22:26, 22:26].astype(int) - air).max() <= 2, "slices outside the slab are not"


def test_unrenderable_series_raise_thumbnail_error_without_phi(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThumbnailError) as caught:
        render_thumbnail(tmp_path / "empty")
    assert "empty" not in str(caught.value), "the message carries no path"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.dcm").write_text("Patient Jane Doe")
    with pytest.raises(ThumbnailError) as caught:
        render_thumbnail(tmp_path / "text")
    assert "Jane" not in str(caught.value)


def test_real_lung_series(lung_ct_dir: Path) -> None:
    image = pixels(render_thumbnail(lung_ct_dir / "Lung_Dx-A0001_series2_5mm", size=192))
    assert image.shape == (192, 192)
    assert image.std() > 20, "an actual picture, not a flat field"


def test_cache_renders_once_per_key_and_again_when_the_series_grows(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    study, series = generate_uid(), generate_uid()
    folder = write_series(tmp_path / "spool" / study / series, marked_volume(), study_uid=study, series_uid=series)
    calls: list[Path] = []
    real_render = thumbnails.render_thumbnail

    def counting_render(series_dir: Path, **kwargs: object) -> bytes:
        calls.append(series_dir)
        time.sleep(0.2)  # long enough for the other threads to pile up on the key's lock
        return real_render(series_dir, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(thumbnails, "render_thumbnail", counting_render)
    cache = ThumbnailCache(tmp_path / "thumbnails")
    results: list[bytes] = []
    workers = [threading.Thread(target=lambda: results.append(
        cache.get(study, series, folder, window="lung", size=64))) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 6
    cached = tmp_path / "thumbnails" / study / f"{series}-lung-64.png"
    assert cached.read_bytes() == results[0]
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")], "no temporary file left"

    cache.get(study, series, folder, window="mediastinum", size=64)
    assert len(calls) == 2, "another window is another key"
    assert cache.get(study, series, folder, window="lung", size=64) == results[0] and len(calls) == 2

    # One more instance arrives (a new study version): the folder is newer than the thumbnail.
    time.sleep(0.01)
    extra = write_series(tmp_path / "extra", marked_volume(slices=1), study_uid=study, series_uid=series,
                         first_slice=5)
    (extra / "005.dcm").rename(folder / "zzz.dcm")
    cache.get(study, series, folder, window="lung", size=64)
    assert len(calls) == 3, "redrawn after the series changed"

    with pytest.raises(ValueError):
        cache.get("../etc", series, folder, window="lung", size=64)


def test_study_thumbnail_from_the_state_store(tmp_path: Path) -> None:
    layout = NodeLayout.create(tmp_path / "node")
    store = StateStore(layout.state_db)
    cache = ThumbnailCache(layout.thumbnails)
    study, series = generate_uid(), generate_uid()
    folder = write_series(layout.study_spool(study) / series, marked_volume(), study_uid=study, series_uid=series)
    first = min(folder.glob("*.dcm"))
    record = InstanceRecord(sop_uid=str(pydicom.dcmread(first).SOPInstanceUID), study_uid=study, series_uid=series,
                            sop_class_uid=CTImageStorage, transfer_syntax=ExplicitVRLittleEndian, path=first,
                            size=first.stat().st_size)
    assert store.record_instance(record, "PACS", "127.0.0.1", quiet_seconds=1)
    assert study_thumbnail(layout, store, cache, study, window="lung", size=48) is None, "no embedded series yet"
    assert store.mark_queued(study, "bundle") == 1
    assert store.finish(study, 1, StudyState.INDEXED, series_uid=series)

    png = study_thumbnail(layout, store, cache, study, window="lung", size=48)
    assert png is not None and brightest_quadrant(png) == "top-left"
    assert (layout.thumbnails / study / f"{series}-lung-48.png").is_file()
    assert study_thumbnail(layout, store, cache, generate_uid(), window="lung", size=48) is None, "unknown study"
    assert study_thumbnail(layout, store, cache, "not-a-uid", window="lung", size=48) is None

    for path in folder.iterdir():  # the spool was cleaned up
        path.unlink()
    folder.rmdir()
    assert study_thumbnail(layout, store, cache, study, window="lung", size=48) is None
    store.close()
