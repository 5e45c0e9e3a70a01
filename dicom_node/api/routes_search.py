"""``GET /studies/{uid}/similar`` and ``POST /search``: the query engine over HTTP, audited.

The routes are plain ``def``: FastAPI runs them in its thread pool, so a query (ONNX text encoder, index search)
never blocks the event loop. The text of a text search goes to the audit trail only, never to the log.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from dicom_node.api import render
from dicom_node.api.auth import Reader
from dicom_node.api.models import SearchRequest, SearchResponse, SimilarQuery
from dicom_node.api.routes_studies import StudyUID
from dicom_node.api.services import Audit, Engine, NodeSettings, Store
from dicom_node.store.state import StateStore
from workers.search import NoBundleError, QueryError, SearchResult, StudyNotFoundError

router = APIRouter(tags=["search"])

RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {render.DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
          "description": f"ranked studies; {render.DICOM_JSON} on request (QIDO-RS study objects, rank and score "
                         "in (0099,1002) US and (0099,1001) FD under private creator MEDFINDER)"},
    406: {"description": "Accept names neither application/json nor application/dicom+json"},
    503: {"description": "no model bundle active yet (the node stores what it receives and embeds it once one "
                         "is activated)"},
    422: {"description": "a bad parameter, filter or body (the message says which)"},
}


@router.get("/studies/{uid}/similar", response_model=SearchResponse, responses=RESULT_RESPONSES,
            summary="Studies similar to one the node holds")
def similar(uid: StudyUID, query: Annotated[SimilarQuery, Query()], principal: Reader, engine: Engine,
            store: Store, audit: Audit, settings: NodeSettings,
            accept: Annotated[str | None, Header()] = None) -> Any:
    media = render.negotiate(accept)
    limit = _limit(query.limit, settings, ("query", "limit"))
    parameters = {"study_uid": uid, **query.model_dump(exclude_none=True), "limit": limit}
    with audit.record(principal.token_name, principal.client, "similar", parameters) as audited:
        try:
            result = engine.similar_to_study(uid, limit=limit, offset=query.offset, filters=query.search_filters(),
                                             min_score=query.min_score,
                                             include_same_patient=query.include_same_patient)
        except StudyNotFoundError as error:
            raise HTTPException(404, detail=str(error) or f"no study {uid} on this node") from None
        except NoBundleError as error:
            raise HTTPException(503, detail=str(error)) from None
        except QueryError as error:
            raise HTTPException(422, detail=str(error)) from None
        audited.results = [hit.study_uid for hit in result.hits]
        return _respond(result, media, store, settings)


@router.post("/search", response_model=SearchResponse, responses=RESULT_RESPONSES,
             summary="Studies matching a report or free text (a finding name alone works too)")
def search(body: SearchRequest, principal: Reader, engine: Engine, store: Store, audit: Audit,
           settings: NodeSettings, accept: Annotated[str | None, Header()] = None) -> Any:
    media = render.negotiate(accept)
    limit = _limit(body.limit, settings, ("body", "limit"))
    parameters = {**body.model_dump(exclude_none=True), "limit": limit}  # the text included: see audit.py
    with audit.record(principal.token_name, principal.client, "search", parameters) as audited:
        filters = body.filters.search_filters() if body.filters else None
        try:
            result = engine.search_text(body.text, limit=limit, offset=body.offset, filters=filters,
                                        min_score=body.min_score)
        except NoBundleError as error:
            raise HTTPException(503, detail=str(error)) from None
        except QueryError as error:
            raise HTTPException(422, detail=str(error)) from None
        audited.results = [hit.study_uid for hit in result.hits]
        return _respond(result, media, store, settings)


def _limit(asked: int | None, settings: NodeSettings, where: tuple[str, str]) -> int:
    """The asked limit, or the configured default; above the configured maximum is a 422 like FastAPI's own."""
    if asked is None:
        return settings.query.default_limit
    if asked > settings.query.max_limit:
        raise RequestValidationError([{"type": "less_than_equal", "loc": where, "input": asked,
                                       "ctx": {"le": settings.query.max_limit},
                                       "msg": f"Input should be less than or equal to {settings.query.max_limit}"}])
    return asked


def _respond(result: SearchResult, media: str, store: StateStore, settings: NodeSettings) -> Response:
    identities = _identities(store, result) if settings.query.return_patient_identity else {}
    if media == render.DICOM_JSON:
        return JSONResponse(render.dicom_json(result, identities, settings.query.retrieve_ae_title),
                            media_type=render.DICOM_JSON)
    return JSONResponse(render.json_response(result, identities).model_dump(mode="json"))


def _identities(store: StateStore, result: SearchResult) -> dict[str, render.Identity]:
    found: dict[str, render.Identity] = {}
    for hit in result.hits:
        attributes = store.study_attributes(hit.study_uid)
        if attributes is not None:
            found[hit.study_uid] = (attributes.patient_name, attributes.patient_id)
    return found

