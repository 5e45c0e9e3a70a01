"""Manifest builders for the public CT-report datasets (BIMCV-R, CT-RATE).

Each dataset ships volumes in its own folder layout with reports and labels in its own CSVs; the trainer reads
only the manifest, so the layout knowledge lives here and nowhere else.

Missing volumes: a CSV row whose volume is not on disk is *returned*, with the path it would have, so that
:func:`trainer.data.row_checks.validate_manifest` names it as "volume file is missing" under ``on_bad_row``
like any other bad row. Dropping it here would shrink the dataset without a trace; pass
``include_missing=False`` to leave such rows out on purpose (e.g. a partial CT-RATE download), which logs
how many were left out. Volumes on disk that no CSV row mentions have no report to train on: they are counted
in a warning.
"""

from __future__ import annotations

import ast
import csv
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainer.data.manifest import LABEL_SEPARATOR, ManifestError, ManifestRow, write_manifest
from trainer.data.splits import DEFAULT_FRACTIONS, assign_patient_splits, patient_unit

logger = logging.getLogger(__name__)

NIFTI_SUFFIX = ".nii.gz"
BIMCVR_CSV_CANDIDATES = ("BIMCV-R.csv", "meta/curated_ct_report_path_En.csv")
_BIMCV_SUBJECT = re.compile(r"sub-S[0-9A-Za-z]+")
# CT-RATE: split_patientID_scanID_reconstructionID, e.g. valid_53_a_1
_CTRATE_NAME = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<patient>[^_]+)_(?P<scan>[^_]+)_(?P<recon>[^_]+)$")
# CT-RATE's "valid" set is the held-out benchmark every CT-CLIP-style paper reports on, so it is our test set.
CTRATE_SPLITS = {"train": "train", "valid": "test", "validation": "test", "test": "test"}
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}  # fmt: skip


# ---------------------------------------------------------------- shared helpers


def _stem(name: str) -> str:
    """``x.nii.gz`` -> ``x``; ``x.nii`` -> ``x`` (``Path.stem`` only strips one suffix)."""
    for suffix in (NIFTI_SUFFIX, ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _basename(path_text: str) -> str:
    """The file name of a path written on any OS (the official CSVs carry the authors' absolute paths)."""
    return re.split(r"[\\/]", path_text.strip())[-1]


def _index_volumes(files: Iterable[Path]) -> dict[str, list[Path]]:
    """Volumes by file name; a list because two folders may hold the same name."""
    index: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(files):
        index[path.name].append(path)
    return index


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """All records of a CSV (BOM tolerated), failing early with the missing column names."""
    if not path.is_file():
        raise ManifestError(f"{path} does not exist")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return [{k: (v or "") for k, v in record.items() if k is not None} for record in reader]


def normalise_label(label: str) -> str:
    """Lower-case, single-spaced, without the manifest's label separator, so labels compare as keywords."""
    return " ".join(str(label).replace(LABEL_SEPARATOR, ",").split()).lower()


def _unique_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Normalised, de-duplicated, in first-seen order; empty ones dropped."""
    out: dict[str, None] = {}
    for label in labels:
        name = normalise_label(label)
        if name:
            out[name] = None
    return tuple(out)


def _normalise_split(value: str, where: str) -> str:
    """Map the spellings seen in public CSVs to train/val/test; an unknown value is an error, not a guess."""
    text = value.strip().lower()
    if not text:
        return ""
    if text not in _SPLIT_ALIASES:
        raise ManifestError(f"{where}: split {value!r} is not one of {sorted(_SPLIT_ALIASES)}")
    return _SPLIT_ALIASES[text]


def _warn_unreferenced(index: dict[str, list[Path]], used: set[str], dataset: str) -> None:
    """Volumes without a report cannot be trained on; say how many so a wrong CSV is noticed."""
    unused = sum(len(paths) for name, paths in index.items() if name not in used)
    if unused:
        logger.warning("%s: %d volume file(s) on disk have no row in the report CSV and are not in the manifest",
                       dataset, unused)


def _warn_left_out(count: int, dataset: str) -> None:
    if count:
        logger.warning("%s: left out %d row(s) whose volume is not on disk (include_missing=False)", dataset, count)


# ---------------------------------------------------------------- BIMCV-R


def parse_label_list(text: str) -> tuple[str, ...]:
    """Parse BIMCV-R's ``Labels`` cell (a Python list literal such as ``"['pneumonia', 'nodule']"``).

    ``ast.literal_eval`` evaluates literals only, never code. Empty cells and pandas' ``nan`` mean no labels.
    Raises ValueError on anything that is not a list/tuple of strings or a single string.
    """
    text = text.strip()
    if not text or text.lower() in ("nan", "none", "[]"):
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"not a Python list literal: {error}") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    return _unique_labels(value)


def find_bimcvr_csv(root: Path) -> Path:
    """The report CSV of a BIMCV-R release: the HF card's ``BIMCV-R.csv``, else the MedFinder code's path."""
    for name in BIMCVR_CSV_CANDIDATES:
        if (root / name).is_file():
            return root / name
    raise ManifestError(f"no BIMCV-R report CSV under {root} (looked for {list(BIMCVR_CSV_CANDIDATES)})")


def _bimcvr_patient(record: dict[str, str], path_text: str, stem: str) -> str:
    """``PatientID``, else the ``sub-S…`` subject in the path (BIDS naming), else the file stem (own patient)."""
    explicit = record.get("PatientID", "").strip()
    if explicit:
        return explicit
    match = _BIMCV_SUBJECT.search(path_text)
    return match.group(0) if match else stem


def _pick_volume(candidates: list[Path], path_text: str, number: int) -> Path:
    """Of same-named volumes, the one sharing the longest folder tail with the CSV path; ties are logged."""
    if len(candidates) == 1:
        return candidates[0]
    wanted = [p for p in re.split(r"[\\/]", path_text.strip()) if p][::-1]

    def shared_tail(path: Path) -> int:
        count = 0
        for mine, theirs in zip(path.parts[::-1], wanted):
            if mine != theirs:
                break
            count += 1
        return count

    best = max(shared_tail(p) for p in candidates)
    tied = [p for p in candidates if shared_tail(p) == best]
    if len(tied) > 1:
        # The path is not logged: BIMCV file names carry the subject id.
        logger.warning("BIMCV-R CSV row %d: %d volumes share its file name; using the first in sorted order",
                       number, len(tied))
    return tied[0]


def build_bimcvr_manifest(
    root: Path, csv_path: Path | None = None, include_missing: bool = True
) -> list[ManifestRow]:
    """Rows for a BIMCV-R release: ``root/CT*/**/*.nii.gz`` plus the report CSV, in CSV order.

    Volumes are matched by the file name of the CSV's ``path``, as the official code does (its paths are the
    authors' absolute paths). ``row_number`` is the CSV data line, so bad rows point back to the source CSV.
    A missing volume keeps the CSV path (under ``root`` if relative) so the row checker can name it.
    """
    root = Path(root)
    csv_path = Path(csv_path) if csv_path is not None else find_bimcvr_csv(root)
    records = _read_csv(csv_path, ("Report_en", "path"))
    index = _index_volumes(root.glob(f"CT*/**/*{NIFTI_SUFFIX}"))
    rows: list[ManifestRow] = []
    used: set[str] = set()
    left_out = 0
    for number, record in enumerate(records, start=1):
        path_text = record["path"].strip()
        name = _basename(path_text)
        stem = _stem(name)
        if name in index:
            volume = _pick_volume(index[name], path_text, number)
            used.add(name)
        elif not include_missing:
            left_out += 1
            continue
        elif not name:
            volume = root / "<empty path cell>"  # never ``root`` itself, which is a folder and would "exist"
        else:
            volume = Path(path_text) if Path(path_text).is_absolute() else root / path_text
        try:
            labels = parse_label_list(record.get("Labels", ""))
        except ValueError as error:
            # One malformed cell should not block a dataset; it is logged (no report text) and left unlabelled.
            logger.warning("BIMCV-R CSV row %d: Labels cell ignored (%s)", number, error)
            labels = ()
        rows.append(
            ManifestRow(
                volume_id=stem,
                volume=volume,
                report=record["Report_en"].strip(),
                patient_id=_bimcvr_patient(record, path_text, stem),
                labels=labels,
                split=_normalise_split(record.get("split", ""), f"{csv_path} row {number}"),
                row_number=number,
            )
        )
    _warn_unreferenced(index, used, "BIMCV-R")
    _warn_left_out(left_out, "BIMCV-R")
    return rows


# ---------------------------------------------------------------- CT-RATE


def parse_ctrate_name(volume_name: str) -> tuple[str, str]:
    """``valid_53_a_1[.nii.gz]`` -> (manifest split, patient id ``valid_53``).

    CT-RATE's ``valid`` set is its held-out test set by convention (CT-CLIP and later work report on it), so it
    maps to ``test``; ``train`` patients stay ``train`` (see :func:`build_ctrate_manifest` for val). The split
    prefix stays in the patient id because CT-RATE numbers patients per split. A name outside the scheme
    gets split "" and its stem as patient id.
    """
    stem = _stem(_basename(volume_name))
    match = _CTRATE_NAME.match(stem)
    if not match:
        return "", stem
    prefix = match["split"].lower()
    return CTRATE_SPLITS.get(prefix, ""), f"{prefix}_{match['patient']}"


def _ctrate_report(record: dict[str, str]) -> str:
    """Findings then impressions, as one text; either may be empty."""
    parts = (record.get("Findings_EN", ""), record.get("Impressions_EN", ""))
    return " ".join(p.strip() for p in parts if p.strip())


def _is_positive(value: str) -> bool:
    """CT-RATE label cells are 0/1 (sometimes written 1.0); anything else is not a positive finding."""
    try:
        return float(value) == 1.0
    except ValueError:
        return False


def read_ctrate_labels(labels_csv: Path) -> dict[str, tuple[str, ...]]:
    """Positive findings per volume stem; every column except ``VolumeName`` (and blank index columns) is a label."""
    records = _read_csv(labels_csv, ("VolumeName",))
    out: dict[str, tuple[str, ...]] = {}
    for record in records:
        names = [k for k, v in record.items() if k.strip() and k != "VolumeName" and not k.startswith("Unnamed")
                 and _is_positive(v)]
        out[_stem(_basename(record["VolumeName"]))] = _unique_labels(names)
    return out


def _pick_ctrate_volume(candidates: list[Path]) -> Path:
    """CT-RATE v2 re-released corrected volumes in ``train_fixed/``/``valid_fixed/``: prefer those over v1 copies."""
    fixed = [p for p in candidates if any(part.endswith("_fixed") for part in p.parts[:-1])]
    return (fixed or candidates)[0]


def build_ctrate_manifest(
    volumes_dir: Path,
    reports_csv: Path,
    labels_csv: Path | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    include_missing: bool = True,
) -> list[ManifestRow]:
    """Rows for CT-RATE: volumes anywhere under ``volumes_dir``, one row per line of the reports CSV.

    Splits are decided here because CT-RATE has an official split: ``valid`` -> ``test``; ``train`` patients
    -> ``val`` for a ``val_fraction`` of them (patient-level, by the same stable hash as
    :func:`~trainer.data.splits.assign_patient_splits`), else ``train``. So the benchmark stays the one
    everyone reports on and model selection never looks at it. Volume ids are the name stems (``train_1_a_1``);
    reconstructions of one scan are separate rows of one patient.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    volumes_dir = Path(volumes_dir)
    records = _read_csv(Path(reports_csv), ("VolumeName", "Findings_EN", "Impressions_EN"))
    labels = read_ctrate_labels(Path(labels_csv)) if labels_csv is not None else {}
    index = _index_volumes(volumes_dir.rglob(f"*{NIFTI_SUFFIX}"))
    rows: list[ManifestRow] = []
    used: set[str] = set()
    left_out = unlabelled = ambiguous = 0
    for number, record in enumerate(records, start=1):
        stem = _stem(_basename(record["VolumeName"]))
        name = stem + NIFTI_SUFFIX
        if name in index:
            volume = _pick_ctrate_volume(index[name])
            used.add(name)
            ambiguous += len(index[name]) > 1
        elif not include_missing:
            left_out += 1
            continue
        else:
            volume = volumes_dir / name
        split, patient = parse_ctrate_name(stem)
        if split == "train" and val_fraction > 0 and patient_unit(patient, seed) < val_fraction:
            split = "val"
        if labels_csv is not None and stem not in labels:
            unlabelled += 1
        rows.append(
            ManifestRow(
                volume_id=stem,
                volume=volume,
                report=_ctrate_report(record),
                patient_id=patient,
                labels=labels.get(stem, ()),
                split=split,
                row_number=number,
            )
        )
    if ambiguous:
        logger.warning("CT-RATE: %d volume name(s) exist in several folders; preferred *_fixed folders", ambiguous)
    if unlabelled:
        logger.warning("CT-RATE: %d row(s) have no line in the labels CSV and carry no labels", unlabelled)
    _warn_unreferenced(index, used, "CT-RATE")
    _warn_left_out(left_out, "CT-RATE")
    return rows


# ---------------------------------------------------------------- writing


def write_built_manifest(
    rows: Sequence[ManifestRow],
    out_path: Path,
    assign_splits: bool = True,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Path:
    """Write built rows as a manifest, first giving unsplit rows a patient-level split (rows with one keep it).

    Volume paths under the manifest's folder are written relative, so the dataset folder can be moved whole.
    """
    if assign_splits:
        rows = assign_patient_splits(rows, fractions=fractions, seed=seed)
    return write_manifest(out_path, rows)
