"""Manifest round trip and patient-level splits."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from trainer.data.manifest import ManifestError, ManifestRow, label_matrix, read_manifest, with_split, write_manifest
from trainer.data.splits import (
    assign_patient_splits,
    find_patient_leaks,
    patient_unit,
    split_for_unit,
)


def make_rows(n_patients: int, scans_per_patient: int = 2) -> list[ManifestRow]:
    """Unsplit rows, ``scans_per_patient`` per patient."""
    rows = []
    for p in range(n_patients):
        for s in range(scans_per_patient):
            number = len(rows) + 1
            rows.append(ManifestRow(f"v{p}_{s}", Path(f"/data/v{p}_{s}.nii.gz"), "report", f"P{p}", row_number=number))
    return rows


def splits_by_patient(rows: list[ManifestRow]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        out[row.patient_id or row.volume_id].add(row.split)
    return out


def test_manifest_round_trip_keeps_relative_paths(tmp_path: Path) -> None:
    rows = [
        ManifestRow(
            "a", tmp_path / "vols" / "a.nii.gz", "text, with comma\nand newline", "P1", ("nodule", "effusion"), "train"
        ),
        ManifestRow("b", tmp_path / "vols" / "b", "other", "", (), ""),
    ]
    path = write_manifest(tmp_path / "manifest.csv", rows)
    assert "vols/a.nii.gz" in path.read_text(encoding="utf-8")
    back = read_manifest(path)
    assert back == rows
    assert [r.row_number for r in back] == [1, 2]


def test_read_manifest_rejects_unknown_split(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("volume_id,volume,report,patient_id,labels,split\na,a.nii.gz,r,p,,holdout\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="row 1"):
        read_manifest(path)


def test_no_patient_in_two_splits() -> None:
    out = assign_patient_splits(make_rows(300, 3))
    assert all(len(s) == 1 for s in splits_by_patient(out).values())
    assert find_patient_leaks(out) == {}
    assert {r.split for r in out} == {"train", "val", "test"}


def test_fractions_respected_on_1000_patients() -> None:
    out = assign_patient_splits(make_rows(1000, 1), fractions=(0.7, 0.1, 0.2), seed=3)
    counts = Counter(r.split for r in out)
    for name, expected in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(counts[name] / 1000 - expected) <= 0.03, counts


def test_same_result_twice_and_stable_under_shuffle() -> None:
    rows = make_rows(200, 2)
    first = {r.volume_id: r.split for r in assign_patient_splits(rows, seed=7)}
    again = {r.volume_id: r.split for r in assign_patient_splits(rows, seed=7)}
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    moved = {r.volume_id: r.split for r in assign_patient_splits(shuffled, seed=7)}
    assert first == again == moved
    # Adding patients must not move existing ones.
    grown = {r.volume_id: r.split for r in assign_patient_splits(rows + make_rows(400, 2)[400:], seed=7)}
    assert all(grown[k] == v for k, v in first.items())


def test_seed_changes_assignment() -> None:
    rows = make_rows(200, 1)
    a = [r.split for r in assign_patient_splits(rows, seed=0)]
    b = [r.split for r in assign_patient_splits(rows, seed=1)]
    assert a != b


def test_hash_is_fixed_across_machines() -> None:
    # sha256("0:P1") is a constant; a change here means every existing split moves.
    assert patient_unit("P1", 0) == int("b811809535b48a00", 16) / 2**64
    assert patient_unit("P1", 0) != patient_unit("P1", 1)


def test_existing_splits_kept_and_followed_by_siblings() -> None:
    rows = make_rows(50, 2)
    # Patient P0's first scan is pinned to val; its second (unsplit) must follow.
    pinned = [with_split(r, "val") if r.volume_id == "v0_0" else r for r in rows]
    out = {r.volume_id: r.split for r in assign_patient_splits(pinned, fractions=(1.0, 0.0, 0.0))}
    assert out["v0_0"] == "val" and out["v0_1"] == "val"
    assert all(v == "train" for k, v in out.items() if not k.startswith("v0_"))


def test_conflicting_input_splits_send_unsplit_rows_to_held_out() -> None:
    rows = [
        ManifestRow("a", Path("a"), "r", "P", split="train", row_number=1),
        ManifestRow("b", Path("b"), "r", "P", split="test", row_number=2),
        ManifestRow("c", Path("c"), "r", "P", row_number=3),
    ]
    out = assign_patient_splits(rows)
    assert [r.split for r in out] == ["train", "test", "test"]
    assert find_patient_leaks(out) == {"P": {"train", "test"}}


def test_empty_patient_id_is_its_own_patient() -> None:
    rows = [ManifestRow(f"v{i}", Path(f"v{i}"), "r", "", row_number=i + 1) for i in range(300)]
    out = assign_patient_splits(rows)
    assert len({r.split for r in out}) == 3
    assert all(r.patient_id == "" for r in out)  # the patient id is not invented


def test_zero_fraction_split_stays_empty() -> None:
    assert split_for_unit(0.999999999, (0.9, 0.1, 0.0)) == "val"
    out = assign_patient_splits(make_rows(500, 1), fractions=(0.9, 0.1, 0.0))
    assert "test" not in {r.split for r in out}


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_rejected(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        assign_patient_splits(make_rows(2), fractions=fractions)


def test_label_matrix_follows_the_given_label_order() -> None:
    rows = [ManifestRow("a", Path("a.nii.gz"), "r", "p1", ("nodule", "emphysema")),
            ManifestRow("b", Path("b.nii.gz"), "r", "p2", ())]
    matrix = label_matrix(rows, ("emphysema", "atelectasis", "nodule"))
    assert matrix.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="no training row carries any of the labels"):
        label_matrix(rows, ("effusion",))
    assert not label_matrix(rows, ("effusion",), for_training=False).any()
