"""Bad manifest rows are named, counted and never silently dropped."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from trainer.data.manifest import ManifestRow, read_manifest, write_manifest
from trainer.data.row_checks import (
    DUPLICATE_VOLUME_ID,
    EMPTY_FOLDER,
    EMPTY_REPORT,
    MISSING_FILE,
    MISSING_VOLUME_ID,
    UNREADABLE,
    BadRow,
    BadRowError,
    RowPolicy,
    check_row,
    validate_manifest,
)

SECRET_REPORT = "Patient Jane Roe has a 4 mm nodule."
SECRET_PATIENT = "sub-S424242"


def write_nifti(path: Path, shape: tuple[int, ...] = (8, 8, 8)) -> Path:
    data = np.full(shape, -1000, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def row(volume: Path, number: int, volume_id: str | None = None, report: str = SECRET_REPORT) -> ManifestRow:
    return ManifestRow(volume_id if volume_id is not None else f"vol_{number:04d}", volume, report, SECRET_PATIENT,
                       row_number=number)


@pytest.fixture()
def mixed_rows(tmp_path: Path) -> list[ManifestRow]:
    """Rows 1 and 5 are good; 2 missing, 3 empty report, 4 duplicate id of row 1."""
    good = write_nifti(tmp_path / "good.nii.gz")
    other = write_nifti(tmp_path / "other.nii.gz")
    return [
        row(good, 1),
        row(tmp_path / "nope.nii.gz", 2),
        row(other, 3, report="  \n "),
        row(other, 4, volume_id="vol_0001"),
        row(other, 5),
    ]


def test_bad_row_str() -> None:
    bad = BadRow(12, "vol_0012", "/path/x.nii.gz", MISSING_FILE)
    assert str(bad) == "row 12 (vol_0012, /path/x.nii.gz): volume file is missing"
    detailed = BadRow(3, "v", "p", UNREADABLE, "VolumeError: 2D")
    assert str(detailed) == "row 3 (v, p): volume is unreadable (VolumeError: 2D)"


def test_check_row_cheap_checks(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz")
    assert check_row(row(good, 1)) is None
    assert check_row(row(tmp_path / "missing.nii.gz", 2)).reason == MISSING_FILE
    assert check_row(row(good, 3, report=" \t")).reason == EMPTY_REPORT
    assert check_row(row(good, 4, volume_id=" ")).reason == MISSING_VOLUME_ID
    (tmp_path / "series").mkdir()
    assert check_row(row(tmp_path / "series", 5)).reason == EMPTY_FOLDER
    (tmp_path / "series" / "1.dcm").write_bytes(b"x")
    assert check_row(row(tmp_path / "series", 6)) is None  # a DICOM folder is checked for files, not opened
    (tmp_path / "zero.nii.gz").write_bytes(b"")
    assert check_row(row(tmp_path / "zero.nii.gz", 7)).reason == "volume file is empty"


def test_unreadable_file_with_load(tmp_path: Path) -> None:
    fake = tmp_path / "x.nii.gz"
    fake.write_text("this is not a NIfTI file\n", encoding="utf-8")
    assert check_row(row(fake, 1)) is None  # without load only existence is checked
    bad = check_row(row(fake, 1), load=True)
    assert bad is not None and bad.reason == UNREADABLE and bad.row_number == 1


@pytest.mark.parametrize("suffix", [".nii.gz", ".npy"])
def test_2d_volume_with_load(tmp_path: Path, suffix: str) -> None:
    flat = tmp_path / f"flat{suffix}"
    if suffix == ".npy":
        np.save(flat, np.zeros((8, 8), dtype=np.int16))
    else:
        write_nifti(flat, (8, 8))
    bad = check_row(row(flat, 9), load=True)
    assert bad is not None and bad.reason == UNREADABLE
    assert str(bad).startswith("row 9 (vol_0009, ")
    assert "Dimensionality" in bad.detail or "dimension" in bad.detail.lower()


def test_good_volume_with_load(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", (16, 16, 16))
    assert check_row(row(good, 1), load=True) is None


def test_skip_mode_counts_and_reports(mixed_rows: list[ManifestRow], caplog: pytest.LogCaptureFixture) -> None:
    policy = RowPolicy("skip")
    with caplog.at_level(logging.WARNING):
        good = validate_manifest(mixed_rows, policy)
    assert [r.row_number for r in good] == [1, 5]
    summary = policy.summary()
    assert summary["skipped"] == 3
    assert summary["reasons"] == {MISSING_FILE: 1, EMPTY_REPORT: 1, DUPLICATE_VOLUME_ID: 1}
    assert [line.split(" (")[0] for line in summary["rows"]] == ["row 2", "row 3", "row 4"]
    assert "first used by row 1" in summary["rows"][2]
    # Warnings name rows, never report text or patient ids.
    assert "row 2" in caplog.text and "volume file is missing" in caplog.text
    assert SECRET_REPORT not in caplog.text and SECRET_PATIENT not in caplog.text
    assert [getattr(r, "row_number", None) for r in caplog.records][:3] == [2, 3, 4]


def test_stop_mode_raises_with_row_number(mixed_rows: list[ManifestRow]) -> None:
    policy = RowPolicy("stop")
    with pytest.raises(BadRowError, match=r"row 2 \(vol_0002, .*nope\.nii\.gz\): volume file is missing") as info:
        validate_manifest(mixed_rows, policy)
    assert info.value.bad.row_number == 2
    assert isinstance(info.value, ValueError)


def test_skip_mode_with_load_on_manifest_file(tmp_path: Path) -> None:
    """Row numbers come from the manifest file, so a skipped row can be found and fixed there."""
    (tmp_path / "vols").mkdir()
    write_nifti(tmp_path / "vols" / "a.nii.gz", (16, 16, 16))
    write_nifti(tmp_path / "vols" / "flat.nii.gz", (8, 8))
    (tmp_path / "vols" / "text.nii.gz").write_text("not an image", encoding="utf-8")
    rows = [
        ManifestRow("a", tmp_path / "vols" / "a.nii.gz", "ok", "P1"),
        ManifestRow("flat", tmp_path / "vols" / "flat.nii.gz", "ok", "P2"),
        ManifestRow("text", tmp_path / "vols" / "text.nii.gz", "ok", "P3"),
    ]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    policy = RowPolicy("skip")
    good = validate_manifest(read_manifest(manifest), policy, load=True)
    assert [r.volume_id for r in good] == ["a"]
    assert policy.summary()["reasons"] == {UNREADABLE: 2}
    assert [s.split(" (")[0] for s in policy.summary()["rows"]] == ["row 2", "row 3"]


def test_policy_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="on_bad_row"):
        RowPolicy("ignore")  # type: ignore[arg-type]
