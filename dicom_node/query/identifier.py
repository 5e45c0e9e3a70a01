"""A C-FIND request identifier turned into a typed query, or an :class:`IdentifierError` saying what is wrong.

Both AE titles answer STUDY level only. Keys with a value this SCP does not match on are listed in
``unsupported`` (the responses then carry 0xFF01, "optional keys not supported"); private keys are never
return keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from config.settings import QuerySettings
from dicom_node.query.matching import (
    IdentifierError,
    Range,
    has_wildcard,
    is_universal,
    parse_date_range,
    parse_time_range,
    parse_uid_list,
)
from dicom_node.query.private_block import requested_limit
from workers.index.base import SearchFilters

STATUS_REFUSED = 0xC000  # Unable to process: a query this node's policy does not answer

KeyKind = Literal["uid", "date", "time", "text", "name", "list", "count"]


@dataclass(frozen=True)
class KeySpec:
    """A study-level key this SCP matches on and fills from :class:`~dicom_node.store.state.StudyAttributes`."""

    keyword: str
    field: str
    kind: KeyKind
    identity: bool = False  # patient identity: matched and returned only with query.return_patient_identity


STUDY_KEYS: dict[str, KeySpec] = {spec.keyword: spec for spec in (
    KeySpec("StudyInstanceUID", "study_uid", "uid"),
    KeySpec("StudyDate", "study_date", "date"),
    KeySpec("StudyTime", "study_time", "time"),
    KeySpec("AccessionNumber", "accession_number", "text"),
    KeySpec("StudyDescription", "study_description", "text"),
    KeySpec("StudyID", "study_id", "text"),
    KeySpec("ModalitiesInStudy", "modalities_in_study", "list"),
    KeySpec("ReferringPhysicianName", "referring_physician_name", "name"),
    KeySpec("PatientName", "patient_name", "name", identity=True),
    KeySpec("PatientID", "patient_id", "text", identity=True),
    KeySpec("PatientBirthDate", "patient_birth_date", "date", identity=True),
    KeySpec("PatientSex", "patient_sex", "text"),
    KeySpec("NumberOfStudyRelatedSeries", "number_of_series", "count"),
    KeySpec("NumberOfStudyRelatedInstances", "number_of_instances", "count"),
)}


@dataclass(frozen=True)
class ReturnKey:
    """A key the request asked to be returned, as it came (tag and VR), in request order."""

    tag: BaseTag
    vr: str
    keyword: str


@dataclass(frozen=True)
class Condition:
    """One matching key with a non-universal value: the parsed form its kind needs."""

    spec: KeySpec
    value: str
    uids: tuple[str, ...] = ()
    range: Range | None = None


@dataclass(frozen=True)
class StudyQuery:
    """An ordinary study-level query."""

    conditions: tuple[Condition, ...]
    return_keys: tuple[ReturnKey, ...]
    unsupported: tuple[str, ...]


@dataclass(frozen=True)
class SimilarQuery:
    """A similar-case query: by study (``study_uid``) or by free text (``text``), never both."""

    study_uid: str | None
    text: str | None
    limit: int
    filters: SearchFilters | None
    return_keys: tuple[ReturnKey, ...]
    unsupported: tuple[str, ...]

    @property
    def kind(self) -> Literal["study", "text"]:
        return "study" if self.study_uid is not None else "text"


def query_text(element: DataElement) -> str:
    """An element's value as the text a query compares (multi-values joined by backslashes)."""
    value = element.value
    if value is None:
        return ""
    if element.VR == "SQ":
        return "" if len(value) == 0 else "(sequence)"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace").strip(" \x00")
    if isinstance(value, MultiValue):
        return "\\".join(str(part) for part in value)
    return str(value).strip()


def _check_level(identifier: Dataset) -> None:
    if "QueryRetrieveLevel" not in identifier:
        raise IdentifierError("QueryRetrieveLevel (0008,0052) is missing", "QueryRetrieveLevel")
    level = str(identifier.QueryRetrieveLevel or "").strip().upper()
    if level != "STUDY":
        raise IdentifierError(f"QueryRetrieveLevel {level[:8] or 'empty'!r}: only STUDY is answered",
                              "QueryRetrieveLevel")


def _keys(identifier: Dataset) -> list[tuple[ReturnKey, str]]:
    """(return key, query text) for each non-private key other than the level and the character set."""
    keys = []
    for element in identifier:
        if element.tag.is_private or element.tag.group in (0x0000, 0x0002):
            continue
        if element.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        keys.append((ReturnKey(element.tag, element.VR, element.keyword or str(element.tag)), query_text(element)))
    return keys


def parse_study_query(identifier: Dataset, settings: QuerySettings) -> StudyQuery:
    """An ordinary study-level query; identity keys with a value are refused unless the policy allows them."""
    _check_level(identifier)
    conditions: list[Condition] = []
    unsupported: list[str] = []
    keys = _keys(identifier)
    for key, text in keys:
        spec = STUDY_KEYS.get(key.keyword)
        if is_universal(text):
            continue
        if spec is None or spec.kind == "count":
            unsupported.append(key.keyword)
            continue
        if spec.identity and not settings.return_patient_identity:
            raise IdentifierError(f"{key.keyword}: matching on patient identity is off",
                                  key.keyword, STATUS_REFUSED)
        if spec.kind == "uid":
            conditions.append(Condition(spec, text, uids=parse_uid_list(text, key.keyword)))
        elif spec.kind == "date":
            conditions.append(Condition(spec, text, range=parse_date_range(text, key.keyword)))
        elif spec.kind == "time":
            conditions.append(Condition(spec, text, range=parse_time_range(text, key.keyword)))
        else:
            conditions.append(Condition(spec, text))
    return StudyQuery(tuple(conditions), tuple(key for key, _ in keys), tuple(unsupported))


def parse_similar_query(identifier: Dataset, settings: QuerySettings) -> SimilarQuery:
    """A similar-case query: StudyInstanceUID = one study, or (without it) StudyDescription = free text.

    StudyDate (date or range), ModalitiesInStudy (one modality) and PatientSex (M/F/O) filter the results;
    (0099,1003) asks for a limit other than ``query.default_limit`` (at most ``query.max_limit``).
    """
    _check_level(identifier)
    keys = _keys(identifier)
    values = {key.keyword: text for key, text in keys}
    study_uid = _similar_study_uid(values.get("StudyInstanceUID", ""))
    text = values.get("StudyDescription", "").strip() or None
    if study_uid is not None and text is not None:
        raise IdentifierError("StudyInstanceUID or StudyDescription text, not both", "StudyDescription")
    if study_uid is None and text is None:
        raise IdentifierError("need StudyInstanceUID (a study) or StudyDescription (a text)",
                              "StudyInstanceUID")
    if text is not None and has_wildcard(text):
        raise IdentifierError("StudyDescription: free text without wildcards * ?", "StudyDescription")
    filters = _filters(values)
    used = {"StudyInstanceUID", "StudyDescription", "StudyDate", "ModalitiesInStudy", "PatientSex"}
    unsupported = tuple(key.keyword for key, value in keys if key.keyword not in used and not is_universal(value))
    return SimilarQuery(study_uid, text, _limit(identifier, settings), filters, tuple(key for key, _ in keys),
                        unsupported)


def _similar_study_uid(text: str) -> str | None:
    if text.strip() == "":
        return None
    if has_wildcard(text) or "\\" in text:
        raise IdentifierError("StudyInstanceUID: one UID, no wildcards or lists", "StudyInstanceUID")
    return parse_uid_list(text)[0]


def _filters(values: dict[str, str]) -> SearchFilters | None:
    fields: dict[str, str] = {}
    date = values.get("StudyDate", "")
    if not is_universal(date):
        date_range = parse_date_range(date)
        if date_range.start:
            fields["study_date_from"] = date_range.start
        if date_range.end:
            fields["study_date_to"] = date_range.end
    modality = values.get("ModalitiesInStudy", "")
    if not is_universal(modality):
        if has_wildcard(modality) or "\\" in modality:
            raise IdentifierError("ModalitiesInStudy: one modality, no wildcards or lists", "ModalitiesInStudy")
        fields["modality"] = modality.strip()
    sex = values.get("PatientSex", "").strip().upper()
    if not is_universal(sex):
        if sex not in ("M", "F", "O"):
            raise IdentifierError("PatientSex: M, F or O", "PatientSex")
        fields["sex"] = sex
    return SearchFilters(**fields) if fields else None


def _limit(identifier: Dataset, settings: QuerySettings) -> int:
    try:
        limit = requested_limit(identifier)
    except ValueError as error:
        raise IdentifierError(str(error)) from None
    if limit is None:
        return min(settings.default_limit, settings.max_limit)
    if not 1 <= limit <= settings.max_limit:
        raise IdentifierError(f"limit (0099,1003) must be 1..{settings.max_limit}")
    return limit
