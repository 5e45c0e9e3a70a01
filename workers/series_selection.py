"""Which series of a received study gets embedded, and why.

A routed CT study usually holds several series: the axial reconstructions we want, but also localizers
(scouts), dose screens, coronal/sagittal reformats and thin/thick duplicates. The rules (configurable in
``selection``) keep axial CT series with enough slices that are neither localizers nor dose/protocol screens,
then prefer the one with most slices (or the thinnest). With a bundle domain (``model_export.domain``), an
eligible series must also be of a body region the bundle was made for (``selection.domain_check``). Every
candidate's verdict is kept so that ``medfinder studies`` can say why a study was not embedded.

Candidates are the spooled series and, once retention deleted the spool, the kept volumes
(``workers.volume_store``): a kept volume is summarised from what was recorded when it was kept.

A multi-frame series (Enhanced CT) is judged like any other: its frames count as slices, and its orientation and
slice thickness come from the functional groups (shared, else the first frame's) since they are not top-level.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from config.settings import SeriesSelectionSettings
from model_export.domain import BundleDomain, DomainVerdict, judge_domain

HEADER_TAGS = ("SeriesInstanceUID", "Modality", "ImageType", "SeriesDescription", "ImageOrientationPatient",
               "SliceThickness", "SOPClassUID", "NumberOfFrames", "SeriesNumber", "BodyPartExamined", "ProtocolName",
               "StudyDescription", "SharedFunctionalGroupsSequence")


@dataclass(frozen=True)
class SeriesSummary:
    """What the headers of one spooled series say (read without pixel data)."""

    series_uid: str
    folder: Path
    n_instances: int
    modality: str
    description: str
    image_types: tuple[str, ...]
    axial_tilt_deg: float | None  # angle between the slice normal and the patient's head-foot axis
    slice_thickness: float | None
    sop_class_uid: str
    series_number: int | None = None
    unreadable: int = 0
    body_part: str = ""  # BodyPartExamined, ProtocolName, StudyDescription: the body region (domain routing)
    protocol_name: str = ""
    study_description: str = ""
    kept: Path | None = None  # a kept volume (``workers.volume_store``) instead of spooled DICOM

    def region_fields(self) -> dict[str, str]:
        """The header fields ``model_export.domain.find_region`` reads."""
        return {"BodyPartExamined": self.body_part, "SeriesDescription": self.description,
                "ProtocolName": self.protocol_name, "StudyDescription": self.study_description}


@dataclass(frozen=True)
class SeriesVerdict:
    series_uid: str
    eligible: bool
    reason: str
    n_instances: int
    description: str


@dataclass(frozen=True)
class SeriesChoice:
    """The chosen series (None when nothing qualifies), one sentence why, and each candidate's verdict."""

    series_uid: str | None
    reason: str
    verdicts: tuple[SeriesVerdict, ...] = field(default_factory=tuple)
    domain: DomainVerdict | None = None  # the chosen (or refused) series against the bundle's domain
    summary: SeriesSummary | None = None  # the chosen series

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"series_uid": self.series_uid, "reason": self.reason,
                                "candidates": [asdict(v) for v in self.verdicts]}
        if self.domain is not None:
            data["domain"] = self.domain.as_dict()
        if self.summary is not None and self.summary.kept is not None:
            data["source"] = "kept volume"
        return data


def _tilt_degrees(orientation: Any) -> float | None:
    try:
        values = np.asarray([float(v) for v in orientation], dtype=float)
    except (TypeError, ValueError):
        return None
    if values.shape != (6,):
        return None
    normal = np.cross(values[:3], values[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(normal[2]) / norm)))


def _functional_group_value(path: Path, header: pydicom.Dataset, sequence: str, keyword: str) -> Any:
    """A multi-frame object's value from its shared functional groups, else its first frame's (read on demand:
    the per-frame sequence is as long as the frames are many)."""
    shared = header.get("SharedFunctionalGroupsSequence") or []
    items = shared[0].get(sequence) if shared else None
    if items and keyword in items[0]:
        return items[0].get(keyword)
    try:
        per_frame = pydicom.dcmread(path, stop_before_pixels=True,
                                    specific_tags=["PerFrameFunctionalGroupsSequence"]).get(
                                        "PerFrameFunctionalGroupsSequence") or []
    except (InvalidDicomError, OSError, ValueError):
        return None
    items = per_frame[0].get(sequence) if per_frame else None
    return items[0].get(keyword) if items and keyword in items[0] else None


def _geometry(path: Path, header: pydicom.Dataset) -> tuple[Any, Any]:
    """ImageOrientationPatient and SliceThickness: top-level for single-frame, functional groups for multi-frame."""
    if int(header.get("NumberOfFrames", 1) or 1) > 1 and "ImageOrientationPatient" not in header:
        return (_functional_group_value(path, header, "PlaneOrientationSequence", "ImageOrientationPatient"),
                _functional_group_value(path, header, "PixelMeasuresSequence", "SliceThickness"))
    return header.get("ImageOrientationPatient"), header.get("SliceThickness")


def read_first_header(series_folder: Path) -> pydicom.Dataset:
    """The header (no pixel data) of a spooled series' first instance by file name: the series' attributes."""
    first = min(series_folder.glob("*.dcm"), default=None)
    if first is None:
        raise FileNotFoundError(f"no instance in {series_folder}")
    return pydicom.dcmread(first, stop_before_pixels=True)


def summarise_series(files: Iterable[Path]) -> list[SeriesSummary]:
    """Group spooled files by series folder and summarise each from its headers."""
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in files:
        by_folder[Path(path).parent].append(Path(path))
    summaries = []
    for folder, paths in sorted(by_folder.items()):
        header, header_path, unreadable, frames = None, None, 0, 0
        for path in sorted(paths):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
            except (InvalidDicomError, OSError, ValueError):  # spooled files were validated: rare
                unreadable += 1
                continue
            if header is None:
                header, header_path = ds, path
            frames += int(ds.get("NumberOfFrames", 1) or 1)
        if header is None or header_path is None:
            summaries.append(SeriesSummary(folder.name, folder, 0, "", "", (), None, None, "", None, unreadable))
            continue
        orientation, thickness = _geometry(header_path, header)
        number = header.get("SeriesNumber")
        text = {keyword: str(header.get(keyword, "") or "")
                for keyword in ("SeriesDescription", "BodyPartExamined", "ProtocolName", "StudyDescription")}
        summaries.append(SeriesSummary(
            series_uid=str(header.get("SeriesInstanceUID", folder.name)),
            folder=folder,
            n_instances=frames,
            modality=str(header.get("Modality", "")),
            description=text["SeriesDescription"],
            image_types=tuple(str(v).upper() for v in (header.get("ImageType") or [])),
            axial_tilt_deg=_tilt_degrees(orientation),
            slice_thickness=float(thickness) if thickness not in (None, "") else None,
            sop_class_uid=str(header.get("SOPClassUID", "")),
            series_number=int(number) if number not in (None, "") else None,
            unreadable=unreadable,
            body_part=text["BodyPartExamined"],
            protocol_name=text["ProtocolName"],
            study_description=text["StudyDescription"],
        ))
    return summaries


def judge_series(summary: SeriesSummary, rules: SeriesSelectionSettings) -> SeriesVerdict:
    """One series against the rules: eligible, or the first rule it breaks."""
    def verdict(eligible: bool, reason: str) -> SeriesVerdict:
        return SeriesVerdict(summary.series_uid, eligible, reason, summary.n_instances, summary.description)

    if summary.n_instances == 0:
        return verdict(False, f"no readable instance ({summary.unreadable} unreadable)")
    if summary.modality not in rules.modalities:
        return verdict(False, f"modality {summary.modality or '(none)'} is not one of {', '.join(rules.modalities)}")
    excluded_types = [t for t in rules.excluded_image_types if t.upper() in summary.image_types]
    if excluded_types:
        return verdict(False, f"image type {'/'.join(summary.image_types)} marks a {excluded_types[0].lower()}")
    words = summary.description.lower()
    excluded_words = [w for w in rules.excluded_descriptions if w.lower() in words]
    if excluded_words:
        return verdict(False, f"series description mentions {excluded_words[0]!r}")
    if summary.axial_tilt_deg is None:
        return verdict(False, "no usable ImageOrientationPatient")
    if summary.axial_tilt_deg > rules.max_axial_tilt_deg:
        return verdict(False, f"not axial: slice normal {summary.axial_tilt_deg:.0f} deg from the patient axis "
                              f"(limit {rules.max_axial_tilt_deg:.0f})")
    if summary.n_instances < rules.min_slices:
        return verdict(False, f"only {summary.n_instances} slice(s), need at least {rules.min_slices}")
    return verdict(True, f"axial {summary.modality}, {summary.n_instances} slices")


def _prefer(eligible: list[SeriesSummary], rules: SeriesSelectionSettings) -> tuple[list[SeriesSummary], str]:
    """Eligible series best first, by the rules' preference, and its name."""
    def thickness(s: SeriesSummary) -> float:
        return s.slice_thickness if s.slice_thickness and s.slice_thickness > 0 else math.inf

    if rules.prefer == "thinnest":
        return sorted(eligible, key=lambda s: (thickness(s), -s.n_instances, s.series_uid)), "thinnest slices"
    return sorted(eligible, key=lambda s: (-s.n_instances, thickness(s), s.series_uid)), "most slices"


def choose_series(summaries: list[SeriesSummary], rules: SeriesSelectionSettings,
                  domain: BundleDomain | None = None) -> SeriesChoice:
    """The series to embed, by the rules (and the bundle's domain when given), with every candidate's verdict.

    A study whose eligible series are all of another body region is refused with the domain's sentence itself
    (e.g. "body region HEAD (BodyPartExamined) is not one the bundle 'X' was made for (CHEST)").
    """
    verdicts = [judge_series(s, rules) for s in summaries]
    eligible = [s for s, v in zip(summaries, verdicts) if v.eligible]
    if not eligible:
        detail = "; ".join(f"series {v.series_uid[-12:]}: {v.reason}" for v in verdicts) or "the study has no series"
        return SeriesChoice(None, f"no series qualifies for embedding ({detail})", tuple(verdicts))
    ranked, why = _prefer(eligible, rules)
    judged: dict[str, DomainVerdict] = {}
    if domain is not None:
        judged = {s.series_uid: judge_domain(domain, s.modality, s.region_fields()) for s in ranked}
        for k, (summary, verdict) in enumerate(zip(summaries, verdicts)):
            if verdict.eligible and not judged[summary.series_uid].matches:
                verdicts[k] = SeriesVerdict(summary.series_uid, False, judged[summary.series_uid].reason,
                                            summary.n_instances, summary.description)
        matching = [s for s in ranked if judged[s.series_uid].matches]
        if not matching:
            reasons = list(dict.fromkeys(judged[s.series_uid].reason for s in ranked))
            reason = reasons[0] if len(reasons) == 1 else "; ".join(
                f"series {s.series_uid[-12:]}: {judged[s.series_uid].reason}" for s in ranked)
            return SeriesChoice(None, reason, tuple(verdicts), judged[ranked[0].series_uid])
        ranked = matching
    best = ranked[0]
    source = "kept volume of series" if best.kept is not None else "series"
    reason = (f"{source} {best.series_uid} ({best.description or 'no description'}): {best.n_instances} slices; "
              f"{why} of {len(ranked)} eligible of {len(summaries)}")
    verdict = judged.get(best.series_uid)
    if verdict is not None:
        reason += f"; {verdict.reason}"
    return SeriesChoice(best.series_uid, reason, tuple(verdicts), verdict, best)
