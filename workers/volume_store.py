"""Kept volumes: the HU volume of a study's embedded series, kept when retention deletes the spooled DICOM.

``retention.keep: volume`` keeps ``<data_dir>/volumes/<StudyUID>/<SeriesUID>.npz`` and deletes the spool once
the study is indexed and reported. The file holds what any bundle needs to embed the series again, whatever its
preprocessing recipe: the assembled volume exactly as :func:`model_export.preprocessing.load_dicom_series` made it
(``hu``: int16 when every voxel is a whole HU number in range, which is lossless for plain CT; float32 otherwise,
e.g. after gantry-tilt or uneven-spacing resampling), its RAS ``affine`` (float64), and ``meta`` (JSON): the series
summary the selection rules judge, and a reduced header (:data:`KEPT_HEADER_KEYWORDS`: the attributes the index
payload, domain routing and the Similar-case SR need; no pixels, no private tags). So the preprocessing gives the
same array, and the same vector, from the kept volume as from the DICOM.

``retention.json`` in the same folder records what retention deleted (and, for ``keep: none``, that nothing was
kept), so a worker that finds nothing to read can say why and where to re-fetch from.
"""

from __future__ import annotations

import json
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from model_export.atomic_files import atomic_path, write_text_atomic
from model_export.preprocessing import Volume, VolumeError
from workers.dicom_uids import check_uid
from workers.series_selection import SeriesSummary, read_first_header

VOLUMES_DIR = "volumes"
KEPT_SUFFIX = ".npz"
RETENTION_RECORD = "retention.json"
FORMAT = "medfinder-kept-volume/1"

#: Header attributes kept with a volume (study and patient identity stay, as they do in the state store).
KEPT_HEADER_KEYWORDS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription", "SeriesDescription",
    "SeriesNumber", "BodyPartExamined", "ProtocolName", "InstitutionName", "ImageType", "SliceThickness",
)
_SUMMARY_FIELDS = ("series_uid", "n_instances", "modality", "description", "image_types", "axial_tilt_deg",
                   "slice_thickness", "sop_class_uid", "series_number", "body_part", "protocol_name",
                   "study_description")


def volume_folder(data_dir: Path, study_uid: str) -> Path:
    """``<data_dir>/volumes/<StudyUID>``: where a study's kept volumes and its retention record live."""
    return Path(data_dir) / VOLUMES_DIR / check_uid(study_uid, "StudyInstanceUID")


def default_volume_folder(study_folder: Path) -> Path:
    """The volume folder beside a spool folder of the node's layout (``spool/<uid>`` -> ``volumes/<uid>``), for
    requests that name none."""
    study_folder = Path(study_folder)
    return study_folder.parent.parent / VOLUMES_DIR / study_folder.name


def kept_volume_path(folder: Path, series_uid: str) -> Path:
    return Path(folder) / f"{check_uid(series_uid, 'SeriesInstanceUID')}{KEPT_SUFFIX}"


def kept_paths(folder: Path | None) -> list[Path]:
    """The kept volumes in ``folder`` (none when it does not exist); temporary files are skipped."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).glob(f"*{KEPT_SUFFIX}") if not p.name.startswith("."))


def reduced_header(header: Dataset) -> Dataset:
    """The attributes of :data:`KEPT_HEADER_KEYWORDS` that ``header`` has (copies)."""
    out = Dataset()
    for keyword in KEPT_HEADER_KEYWORDS:
        if keyword in header:
            out.add(deepcopy(header.data_element(keyword)))
    return out


def _hu_array(array: np.ndarray) -> np.ndarray:
    """int16 when that is lossless (whole HU numbers in range), else the float32 array as it is."""
    info = np.iinfo(np.int16)
    if array.size and np.isfinite(array).all() and array.min() >= info.min and array.max() <= info.max:
        as_int = array.astype(np.int16)
        if np.array_equal(as_int, array):
            return as_int
    return np.asarray(array, dtype=np.float32)


def save_kept_volume(folder: Path, summary: SeriesSummary, volume: Volume, header: Dataset) -> Path:
    """Write one series' kept volume atomically; returns its path."""
    path = kept_volume_path(folder, summary.series_uid)
    meta = {"format": FORMAT, "kept_at": time.time(), "source_meta": volume.meta,
            "summary": {name: getattr(summary, name) for name in _SUMMARY_FIELDS},
            "header": reduced_header(header).to_json_dict()}
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, hu=_hu_array(volume.array), affine=np.asarray(volume.affine, dtype=np.float64),
                            meta=np.array(json.dumps(meta, default=str)))
    return path


@dataclass(frozen=True)
class KeptVolume:
    """A kept volume read back: the volume, its reduced header and its summary for the selection rules."""

    volume: Volume
    header: Dataset
    summary: SeriesSummary


def _meta(path: Path, data: Any) -> dict[str, Any]:
    meta = json.loads(str(data["meta"][()]))
    if meta.get("format") != FORMAT:
        raise VolumeError(f"{path}: not a kept volume of format {FORMAT} ({meta.get('format')!r})")
    return meta


def _summary(path: Path, meta: dict[str, Any]) -> SeriesSummary:
    fields = dict(meta["summary"])
    fields["image_types"] = tuple(fields.get("image_types") or ())
    return SeriesSummary(folder=path.parent, kept=path, **fields)


def _open(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise VolumeError(f"{path}: cannot read the kept volume ({type(error).__name__}: {error})") from error


def read_kept_summary(path: Path) -> SeriesSummary:
    """The summary of a kept volume, without reading its voxels."""
    with _open(path) as data:
        return _summary(path, _meta(path, data))


def read_kept_header(path: Path) -> Dataset:
    """The reduced header of a kept volume, without reading its voxels."""
    with _open(path) as data:
        return Dataset.from_json(_meta(path, data)["header"])


def load_kept_volume(path: Path) -> KeptVolume:
    """A kept volume as a :class:`~model_export.preprocessing.Volume` (float32 HU), its header and summary."""
    path = Path(path)
    with _open(path) as data:
        meta = _meta(path, data)
        volume = Volume(array=data["hu"].astype(np.float32), affine=data["affine"], source=str(path),
                        meta={**meta.get("source_meta", {}), "format": "kept-volume"})
    return KeptVolume(volume, Dataset.from_json(meta["header"]), _summary(path, meta))


def kept_summaries(folder: Path | None) -> list[SeriesSummary]:
    """Summaries of every kept volume of a study (unreadable files are skipped: the spool or a re-fetch decides)."""
    summaries = []
    for path in kept_paths(folder):
        try:
            summaries.append(read_kept_summary(path))
        except (VolumeError, KeyError, json.JSONDecodeError, TypeError):
            continue
    return summaries


def merge_candidates(spooled: list[SeriesSummary], kept: list[SeriesSummary]) -> tuple[list[SeriesSummary],
                                                                                         list[str]]:
    """Spooled series and kept volumes as one candidate list, and notes on what was set aside.

    A spooled series that also has a kept volume arrived (again, or late) after retention deleted its spool: the
    spooled files win when they are at least as many instances as the volume was made of (a re-send, a
    re-fetch); otherwise they are late instances that cannot be merged into the kept volume, which is used as kept.
    """
    by_uid = {s.series_uid: s for s in kept}
    out, notes = [], []
    for summary in spooled:
        volume = by_uid.get(summary.series_uid)
        if volume is None:
            out.append(summary)
        elif summary.n_instances >= volume.n_instances:
            out.append(summary)
            del by_uid[summary.series_uid]
        else:
            notes.append(f"{summary.n_instances} instance(s) of series {summary.series_uid} arrived after its spool "
                         f"was deleted; they are stored but not merged into its kept volume "
                         f"({volume.n_instances} instances)")
    return out + list(by_uid.values()), notes


def series_header(study_folder: Path, series_uid: str, folder: Path | None = None) -> Dataset:
    """The header of a study's series: its first spooled instance, else its kept volume's reduced header."""
    spooled = Path(study_folder) / series_uid
    try:
        return read_first_header(spooled)
    except FileNotFoundError:
        pass
    path = kept_volume_path(folder or default_volume_folder(study_folder), series_uid)
    if path.is_file():
        return read_kept_header(path)
    raise FileNotFoundError(f"series {series_uid} is neither spooled nor kept")


def write_retention_record(folder: Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(folder) / RETENTION_RECORD, json.dumps(record, sort_keys=True))


def read_retention_record(folder: Path | None) -> dict[str, Any] | None:
    """What retention deleted of a study (None when it never ran for it)."""
    if folder is None:
        return None
    try:
        return dict(json.loads((Path(folder) / RETENTION_RECORD).read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError, TypeError, ValueError):
        return None

