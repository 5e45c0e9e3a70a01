"""C-FIND response identifiers and failure statuses.

A response carries the keys the request asked for (an unknown key comes back empty, PS3.4 C.4.1.1.3.2),
QueryRetrieveLevel, StudyInstanceUID (the unique key), RetrieveAETitle when ``query.retrieve_ae_title`` is set,
and SpecificCharacterSet ``ISO_IR 192`` only when a value needs more than ASCII. Patient identity (PatientName,
PatientID, PatientBirthDate) is returned empty unless ``query.return_patient_identity``.
"""

from __future__ import annotations

from dataclasses import fields, replace

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from config.settings import QuerySettings
from dicom_node.query.identifier import STUDY_KEYS, ReturnKey
from dicom_node.query.private_block import add_rank_and_score
from dicom_node.store.state import StudyAttributes
from workers.search import SearchHit

# What a similar-case response always carries, asked or not: the hit is useless without them.
SIMILAR_KEYS = ("StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription", "ModalitiesInStudy")
_LO_MAX = 64
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


def _return_key(keyword: str) -> ReturnKey:
    tag = Tag(tag_for_keyword(keyword))
    return ReturnKey(tag, dictionary_VR(tag), keyword)


def _value(key: ReturnKey, study: StudyAttributes, settings: QuerySettings) -> object:
    """The response value of one key (empty for keys this node does not hold, and for withheld identity)."""
    spec = STUDY_KEYS.get(key.keyword)
    if key.vr == "SQ":
        return Sequence([])
    if spec is None or (spec.identity and not settings.return_patient_identity):
        return None
    value = getattr(study, spec.field)
    if spec.kind == "list":
        return list(value) if value else None
    if spec.kind == "count":
        return str(value)
    return value


def study_response(study: StudyAttributes, keys: tuple[ReturnKey, ...], settings: QuerySettings,
                   always: tuple[str, ...] = ("StudyInstanceUID",)) -> Dataset:
    """The response identifier of one study for the requested ``keys`` (plus the ``always`` keys)."""
    response = Dataset()
    response.QueryRetrieveLevel = "STUDY"
    requested = {key.keyword for key in keys}
    for key in (*keys, *(_return_key(keyword) for keyword in always if keyword not in requested)):
        vr = dictionary_VR(key.tag) if key.keyword in STUDY_KEYS else key.vr
        response.add_new(key.tag, vr, _value(ReturnKey(key.tag, vr, key.keyword), study, settings))
    if settings.retrieve_ae_title:
        response.RetrieveAETitle = settings.retrieve_ae_title
    _set_character_set(response)
    return response


def rank_prefix(rank: int, score: float) -> str:
    """``#1 0.87 ``: rank and score where any viewer shows them (the start of StudyDescription)."""
    return f"#{rank} {score:.2f} "


def hit_attributes(hit: SearchHit, stored: StudyAttributes | None) -> StudyAttributes:
    """The study's stored attributes, gaps filled from the hit's index payload (or the payload alone)."""
    from_hit = StudyAttributes(study_uid=hit.study_uid, study_date=hit.study_date,
                               accession_number=hit.accession_number, study_description=hit.study_description,
                               modalities_in_study=(hit.modality,) if hit.modality else ())
    if stored is None:
        return from_hit
    gaps = {f.name: getattr(from_hit, f.name) for f in fields(StudyAttributes)
            if not getattr(stored, f.name) and getattr(from_hit, f.name)}
    return replace(stored, **gaps)


def similar_response(hit: SearchHit, stored: StudyAttributes | None, keys: tuple[ReturnKey, ...],
                     settings: QuerySettings) -> Dataset:
    """One ranked similar study: the requested keys plus :data:`SIMILAR_KEYS`, rank and score twice over."""
    study = hit_attributes(hit, stored)
    response = study_response(study, keys, settings, always=SIMILAR_KEYS)
    description = rank_prefix(hit.rank, hit.score) + (study.study_description or "")
    response.StudyDescription = description[:_LO_MAX].rstrip()
    add_rank_and_score(response, hit.rank, hit.score)
    _set_character_set(response)
    return response


def failure_status(status: int, comment: str, keyword: str | None = None) -> Dataset:
    """A failure (or cancel) status with its Error Comment (LO: 64 characters) and Offending Element."""
    result = Dataset()
    result.Status = status
    text = " ".join(comment.replace("\\", "/").split())
    if text:
        result.ErrorComment = text[:_LO_MAX]
    tag = tag_for_keyword(keyword) if keyword else None
    if tag is not None:
        result.OffendingElement = [Tag(tag)]
    return result


def _set_character_set(response: Dataset) -> None:
    """``ISO_IR 192`` (UTF-8) when any text value is not plain ASCII; the default repertoire otherwise."""
    for element in response:
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        if not all(str(value).isascii() for value in values):
            response.SpecificCharacterSet = "ISO_IR 192"
            return
