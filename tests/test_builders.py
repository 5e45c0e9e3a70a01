"""Manifest builders on tiny fake BIMCV-R and CT-RATE trees."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from config.settings import default_shared_data_dir as shared_data_dir
from trainer.data.builders import (
    build_bimcvr_manifest,
    build_ctrate_manifest,
    parse_ctrate_name,
    parse_label_list,
    write_built_manifest,
)
from trainer.data.manifest import ManifestError, read_manifest
from trainer.data.row_checks import RowPolicy, validate_manifest
from trainer.data.splits import find_patient_leaks, patient_unit

CTRATE_LABELS = ("Pleural effusion", "Lymphadenopathy", "Emphysema", "Lung nodule")


def write_nifti(path: Path) -> Path:
    """An 8x8x8 int16 volume: enough for a file that exists and loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((8, 8, 8), -1000, dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def bimcv_name(subject: str, session: str) -> str:
    return f"{subject}_{session}_run-1_bp-chest_ct.nii.gz"


@pytest.fixture()
def bimcvr_root(tmp_path: Path) -> Path:
    """Two CT folders, three scans of two patients, plus one scan missing from disk."""
    root = tmp_path / "BIMCV-R"
    names = [bimcv_name("sub-S0001", "ses-E01"), bimcv_name("sub-S0001", "ses-E02"), bimcv_name("sub-S0002", "ses-E03")]
    write_nifti(root / "CT1" / "ct" / names[0])
    write_nifti(root / "CT1" / "ct" / names[1])
    write_nifti(root / "CT2" / "ct" / "nested" / names[2])
    authors = "/h3cstore_ns/CT_data/CT_retrieval/CT1/ct/"
    write_csv(
        root / "meta" / "curated_ct_report_path_En.csv",
        ["PatientID", "Report_en", "path", "Labels"],
        [
            ["", " Ground glass opacities. ", authors + names[0], "['ground glass pattern', 'pneumonia']"],
            ["", "Unchanged.", authors + names[1], "['Unchanged', ' pneumonia ', 'unchanged']"],
            ["", "Right pleural effusion.", "CT2/ct/" + names[2], "[]"],
            ["", "A nodule.", authors + bimcv_name("sub-S0003", "ses-E04"), "nan"],
        ],
    )
    return root


def test_bimcvr_rows_labels_patients(bimcvr_root: Path) -> None:
    rows = build_bimcvr_manifest(bimcvr_root)
    assert [r.row_number for r in rows] == [1, 2, 3, 4]
    assert rows[0].volume_id == "sub-S0001_ses-E01_run-1_bp-chest_ct"
    assert rows[0].volume == bimcvr_root / "CT1" / "ct" / bimcv_name("sub-S0001", "ses-E01")
    assert rows[2].volume.is_file()  # found by file name in a nested folder
    assert rows[0].report == "Ground glass opacities."
    assert rows[0].labels == ("ground glass pattern", "pneumonia")
    assert rows[1].labels == ("unchanged", "pneumonia")
    assert rows[2].labels == () and rows[3].labels == ()
    assert [r.patient_id for r in rows] == ["sub-S0001", "sub-S0001", "sub-S0002", "sub-S0003"]
    assert all(r.split == "" for r in rows)


def test_bimcvr_missing_volume_is_returned_and_reported(bimcvr_root: Path) -> None:
    rows = build_bimcvr_manifest(bimcvr_root)
    assert not rows[3].volume.exists()
    policy = RowPolicy("skip")
    good = validate_manifest(rows, policy)
    assert len(good) == 3
    assert policy.summary()["reasons"] == {"volume file is missing": 1}
    assert policy.summary()["rows"][0].startswith("row 4 (sub-S0003_ses-E04_run-1_bp-chest_ct, ")


def test_bimcvr_include_missing_false_logs(bimcvr_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        rows = build_bimcvr_manifest(bimcvr_root, include_missing=False)
    assert len(rows) == 3
    assert "left out 1 row" in caplog.text


def test_bimcvr_patient_column_split_column_and_default_csv(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    write_nifti(root / "CT01" / "scan_a.nii.gz")
    write_nifti(root / "CT01" / "scan_b.nii.gz")
    write_csv(
        root / "BIMCV-R.csv",
        ["PatientID", "Report_en", "path", "split"],
        [["sub-S9", "r1", "scan_a.nii.gz", "Validation"], ["", "r2", "scan_b.nii.gz", ""]],
    )
    rows = build_bimcvr_manifest(root)
    assert [r.patient_id for r in rows] == ["sub-S9", "scan_b"]  # no sub-S… in the path: the stem
    assert [r.split for r in rows] == ["val", ""]


def test_bimcvr_bad_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ManifestError, match="no BIMCV-R report CSV"):
        build_bimcvr_manifest(tmp_path)
    write_csv(tmp_path / "BIMCV-R.csv", ["Report_en"], [["r"]])
    with pytest.raises(ManifestError, match="path"):
        build_bimcvr_manifest(tmp_path)
    write_csv(tmp_path / "BIMCV-R.csv", ["Report_en", "path", "Labels"], [["r", "x.nii.gz", "__import__('os')"]])
    with caplog.at_level(logging.WARNING):
        rows = build_bimcvr_manifest(tmp_path)
    assert rows[0].labels == () and "row 1: Labels cell ignored" in caplog.text
    write_csv(tmp_path / "BIMCV-R.csv", ["Report_en", "path"], [["r", ""]])
    (tmp_path / "CT1").mkdir()
    write_nifti(tmp_path / "CT1" / "a.nii.gz")
    empty_path = build_bimcvr_manifest(tmp_path)[0]
    assert not empty_path.volume.exists()  # not the root folder, which would pass an existence check
    policy = RowPolicy("skip")
    assert validate_manifest([empty_path], policy) == [] and "<empty path cell>" in policy.summary()["rows"][0]
    write_csv(tmp_path / "BIMCV-R.csv", ["Report_en", "path", "split"], [["r", "x.nii.gz", "holdout"]])
    with pytest.raises(ManifestError, match="row 1"):
        build_bimcvr_manifest(tmp_path)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("['pneumonia', 'nodule']", ("pneumonia", "nodule")),
        ('["COVID 19",  "Ground  Glass pattern"]', ("covid 19", "ground glass pattern")),
        ("'single'", ("single",)),
        ("", ()),
        ("[]", ()),
        ("nan", ()),
        ("['a;b']", ("a,b",)),
    ],
)
def test_parse_label_list(cell: str, expected: tuple[str, ...]) -> None:
    assert parse_label_list(cell) == expected


@pytest.mark.parametrize("cell", ["[1, 2]", "pneumonia, nodule", "{'a': 1}", "[open('x')]"])
def test_parse_label_list_rejects(cell: str) -> None:
    with pytest.raises(ValueError):
        parse_label_list(cell)


# ---------------------------------------------------------------- CT-RATE


def ctrate_tree(tmp_path: Path, label_columns: tuple[str, ...] = CTRATE_LABELS) -> tuple[Path, Path, Path]:
    """Train patients 1..40 (two reconstructions each for patient 1), valid patients 1..2, one missing volume."""
    vols = tmp_path / "dataset"
    names = ["train_1_a_1", "train_1_a_2"] + [f"train_{p}_a_1" for p in range(2, 41)] + ["valid_1_a_1", "valid_2_b_1"]
    for name in names:
        patient = "_".join(name.split("_")[:2])
        folder = "train_fixed" if name.startswith("train") else "valid_fixed"
        write_nifti(vols / folder / patient / "_".join(name.split("_")[:3]) / f"{name}.nii.gz")
    reports = write_csv(
        tmp_path / "train_reports.csv",
        ["VolumeName", "ClinicalInformation_EN", "Findings_EN", "Impressions_EN"],
        [[f"{n}.nii.gz", "", f"Findings of {n}. ", f" Impression {n}."] for n in names]
        + [["valid_3_a_1.nii.gz", "", "", "No acute findings."]],
    )
    label_rows = []
    for i, n in enumerate(names):
        values = ["1" if (i + j) % 3 == 0 else "0" for j in range(len(label_columns))]
        label_rows.append([f"{n}.nii.gz", *values])
    label_rows[0][1:] = ["1.0"] + ["0"] * (len(label_columns) - 1)
    labels = write_csv(tmp_path / "labels.csv", ["VolumeName", *label_columns], label_rows)
    return vols, reports, labels


def test_parse_ctrate_name() -> None:
    assert parse_ctrate_name("valid_53_a_1.nii.gz") == ("test", "valid_53")
    assert parse_ctrate_name("train_12_b_2") == ("train", "train_12")
    assert parse_ctrate_name("odd-name.nii.gz") == ("", "odd-name")


def test_ctrate_rows_labels_patients_splits(tmp_path: Path) -> None:
    vols, reports, labels = ctrate_tree(tmp_path)
    rows = build_ctrate_manifest(vols, reports, labels, val_fraction=0.25, seed=2)
    by_id = {r.volume_id: r for r in rows}
    assert len(rows) == 44
    first = by_id["train_1_a_1"]
    assert first.report == "Findings of train_1_a_1. Impression train_1_a_1."
    assert first.labels == ("pleural effusion",)  # "1.0" counts; lower-cased
    assert first.volume.is_file() and "train_fixed" in first.volume.parts
    assert by_id["train_1_a_2"].patient_id == "train_1" == first.patient_id
    assert by_id["valid_2_b_1"].patient_id == "valid_2"
    assert by_id["valid_1_a_1"].split == by_id["valid_2_b_1"].split == "test"
    train_rows = [r for r in rows if r.volume_id.startswith("train")]
    assert {r.split for r in train_rows} == {"train", "val"}  # a quarter of 40 train patients carved out as val
    assert all((r.split == "val") == (patient_unit(r.patient_id, 2) < 0.25) for r in train_rows)
    assert find_patient_leaks(rows) == {}
    # The report row without a volume is returned (for the row checker), with no labels.
    missing = by_id["valid_3_a_1"]
    assert not missing.volume.exists() and missing.report == "No acute findings." and missing.labels == ()


def test_ctrate_val_fraction_zero_and_no_labels(tmp_path: Path) -> None:
    vols, reports, _ = ctrate_tree(tmp_path)
    rows = build_ctrate_manifest(vols, reports, None, val_fraction=0.0, include_missing=False)
    assert len(rows) == 43
    assert {r.split for r in rows} == {"train", "test"}
    assert all(r.labels == () for r in rows)


def test_ctrate_labels_from_real_schema(tmp_path: Path) -> None:
    """The 18 label columns of the shared CT-RATE report subset (header only; no content is copied)."""
    reference = shared_data_dir() / "reports" / "ct-rate-chest-ct-reports" / "train.csv"
    if not reference.is_file():
        pytest.skip(f"{reference} not found")
    with reference.open(newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    columns = tuple(header[2:])
    assert len(columns) == 18 and "Pleural effusion" in columns
    vols, reports, labels = ctrate_tree(tmp_path, columns)
    rows = build_ctrate_manifest(vols, reports, labels)
    seen = {label for r in rows for label in r.labels}
    assert seen <= {c.lower() for c in columns} and len(seen) == 18


def test_write_built_manifest_round_trip(tmp_path: Path) -> None:
    vols, reports, labels = ctrate_tree(tmp_path)
    built = build_ctrate_manifest(vols, reports, labels)
    path = write_built_manifest(built, tmp_path / "manifest.csv", assign_splits=True)
    back = read_manifest(path)
    assert [(r.volume_id, r.split, r.labels, r.patient_id) for r in back] == [
        (r.volume_id, r.split, r.labels, r.patient_id) for r in built
    ]
    assert "dataset/train_fixed" in path.read_text(encoding="utf-8")  # relative to the manifest


def test_write_built_manifest_assigns_patient_splits(bimcvr_root: Path, tmp_path: Path) -> None:
    rows = build_bimcvr_manifest(bimcvr_root)
    back = read_manifest(write_built_manifest(rows, tmp_path / "out" / "m.csv", seed=5))
    assert all(r.split for r in back)
    assert find_patient_leaks(back) == {}
    assert len({r.split for r in back if r.patient_id == "sub-S0001"}) == 1
    unsplit = read_manifest(write_built_manifest(rows, tmp_path / "raw.csv", assign_splits=False))
    assert all(r.split == "" for r in unsplit)
