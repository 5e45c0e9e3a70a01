"""Search results as the client asked: our JSON (default) or QIDO-RS-style DICOM JSON (``application/dicom+json``).

The DICOM JSON is built with pydicom (``Dataset.to_json_dict``), one object per study with the C-FIND return keys
and rank/score in the private block of creator ``MEDFINDER`` at (0099,0010): (0099,1001) FD score, (0099,1002)
US rank — the same private scheme as the C-FIND SCP and the Structured Report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException
from pydicom.dataset import Dataset

from dicom_node.api.models import ResultItem, SearchResponse
from workers.search import SearchHit, SearchResult

JSON = "application/json"
DICOM_JSON = "application/dicom+json"
PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "MEDFINDER"
SCORE_ELEMENT = 0x01  # (0099,1001) FD
RANK_ELEMENT = 0x02  # (0099,1002) US


def negotiate(accept: str | None) -> str:
    """The media type to answer with: the client's best of JSON and DICOM JSON (q-values, wildcards), 406 if it
    accepts neither."""
    if not accept or not accept.strip():
        return JSON
    best, best_rank = None, (0.0, -1)
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        for offered in (JSON, DICOM_JSON):  # JSON first: it wins ties and wildcards
            specificity = {offered: 2, "application/*": 1, "*/*": 0}.get(media)
            if specificity is not None and q > 0 and (q, specificity) > best_rank:
                best, best_rank = offered, (q, specificity)
    if best is None:
        raise HTTPException(406, detail=f"can answer {JSON} or {DICOM_JSON}, not {accept}")
    return best


Identity = tuple[str | None, str | None]  # (PatientName, PatientID)


def json_response(result: SearchResult, identities: Mapping[str, Identity]) -> SearchResponse:
    return SearchResponse(query=dict(result.query), bundle_id=result.bundle_id,
                          results=[_item(hit, identities.get(hit.study_uid)) for hit in result.hits])


def _item(hit: SearchHit, identity: Identity | None) -> ResultItem:
    name, patient_id = identity or (None, None)
    return ResultItem(rank=hit.rank, score=hit.score, study_instance_uid=hit.study_uid,
                      accession_number=hit.accession_number, study_date=hit.study_date,
                      study_description=hit.study_description, modality=hit.modality, body_part=hit.body_part,
                      has_report=hit.has_report, patient_name=name, patient_id=patient_id)


def dicom_json(result: SearchResult, identities: Mapping[str, Identity],
               retrieve_ae_title: str | None) -> list[dict[str, Any]]:
    """One QIDO-RS study object per hit, in rank order."""
    return [_dataset(hit, identities.get(hit.study_uid), retrieve_ae_title).to_json_dict() for hit in result.hits]


def _dataset(hit: SearchHit, identity: Identity | None, retrieve_ae_title: str | None) -> Dataset:
    ds = Dataset()
    ds.StudyDate = hit.study_date or ""
    ds.AccessionNumber = hit.accession_number or ""
    ds.StudyDescription = hit.study_description or ""
    ds.ModalitiesInStudy = hit.modality or ""
    ds.BodyPartExamined = hit.body_part or ""
    ds.StudyInstanceUID = hit.study_uid
    if retrieve_ae_title:
        ds.RetrieveAETitle = retrieve_ae_title
    if identity is not None:
        ds.PatientName = identity[0] or ""
        ds.PatientID = identity[1] or ""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(SCORE_ELEMENT, "FD", float(hit.score))
    block.add_new(RANK_ELEMENT, "US", int(hit.rank))
    return ds
