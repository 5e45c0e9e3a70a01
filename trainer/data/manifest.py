"""The dataset manifest: one row per volume, the only format the trainer reads.

A manifest is a CSV with the columns :data:`MANIFEST_COLUMNS`. ``volume`` is a NIfTI file or a DICOM
series folder, relative to the manifest's own folder unless absolute; ``labels`` is a ``;``-separated
list of finding names (the ground truth for keyword retrieval, never string matching on the report);
``split`` is ``train``, ``val``, ``test`` or empty (then :func:`assign_patient_splits` decides).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

MANIFEST_COLUMNS = ("volume_id", "volume", "report", "patient_id", "labels", "split")
SPLITS = ("train", "val", "test")
LABEL_SEPARATOR = ";"


@dataclass(frozen=True)
class ManifestRow:
    """One volume and its report. ``row_number`` is the 1-based data line in the file it came from."""

    volume_id: str
    volume: Path
    report: str
    patient_id: str
    labels: tuple[str, ...] = ()
    split: str = ""
    row_number: int = field(default=0, compare=False)


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing columns, unknown split...)."""


def label_matrix(rows: Sequence[ManifestRow], names: Sequence[str], for_training: bool = True) -> np.ndarray:
    """``[N, L]`` float 0/1 targets: row n, column l is 1 when ``rows[n]`` carries label ``names[l]``.

    Training on labels that no row carries would teach "always absent", so that is an error, not a no-op.
    """
    matrix = np.array([[name in row.labels for name in names] for row in rows], dtype=np.float32).reshape(len(rows), len(names))
    if for_training and not matrix.any():
        raise ValueError(f"no training row carries any of the labels {list(names)} (loss.label_names); "
                         "set the labels in the manifest or turn the label loss off")
    return matrix


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Read a manifest CSV; volume paths become absolute (relative ones are taken from the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    base = path.resolve().parent
    rows: list[ManifestRow] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing} (expected {list(MANIFEST_COLUMNS)})")
        for number, record in enumerate(reader, start=1):
            split = (record["split"] or "").strip()
            if split and split not in SPLITS:
                raise ManifestError(f"{path} row {number}: split {split!r} is not one of {SPLITS}")
            volume = Path(record["volume"])
            labels = tuple(x.strip() for x in (record["labels"] or "").split(LABEL_SEPARATOR) if x.strip())
            rows.append(
                ManifestRow(
                    volume_id=(record["volume_id"] or "").strip() or f"row{number}",
                    volume=volume if volume.is_absolute() else base / volume,
                    report=record["report"] or "",
                    patient_id=(record["patient_id"] or "").strip(),
                    labels=labels,
                    split=split,
                    row_number=number,
                )
            )
    return rows


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], relative_to: Path | None = None) -> Path:
    """Write rows as CSV; volume paths under ``relative_to`` (default: the manifest's folder) stay relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = (relative_to or path.parent).resolve()
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in rows:
            volume = Path(row.volume)
            try:
                volume = volume.resolve().relative_to(base)
            except ValueError:
                pass
            writer.writerow(
                {
                    "volume_id": row.volume_id,
                    "volume": str(volume),
                    "report": row.report,
                    "patient_id": row.patient_id,
                    "labels": LABEL_SEPARATOR.join(row.labels),
                    "split": row.split,
                }
            )
    return path


def rows_in_split(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """The rows of one split, in file order."""
    return [row for row in rows if row.split == split]


def with_split(row: ManifestRow, split: str) -> ManifestRow:
    """A copy of ``row`` assigned to ``split``."""
    return replace(row, split=split)
