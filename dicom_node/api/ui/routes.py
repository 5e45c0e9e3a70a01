"""The pages: landing, login/logout, a study's similar cases, text search, thumbnails; ``install(app)`` adds them.

Routes are plain ``def`` (FastAPI's thread pool: a query or a first thumbnail never blocks the event loop). Every
query is audited like its REST twin (same ``kind``, ``"interface": "ui"`` in the parameters); search text goes to
the audit trail only and travels in a POST body, never in a URL. Jinja2 autoescaping is on for every template.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import ValidationError

from dicom_node.api.models import FilterFields
from dicom_node.api.routes_studies import png_response, thumbnail_png
from dicom_node.api.services import ApiServices, services
from dicom_node.api.tokens import Scope
from dicom_node.api.ui import signing
from dicom_node.api.ui.access import (
    COOKIE,
    DEFAULT_BASE,
    LoginRequired,
    Refused,
    Viewer,
    base_of,
    client_of,
    is_proxied,
    login_location,
    safe_next,
    session_cookie,
    ui_key,
    viewer,
)
from dicom_node.api.ui.cards import Card, result_cards, study_card
from workers.dicom_uids import InvalidUIDError, check_uid
from workers.index.base import IMAGE_VECTOR
from workers.search import NoBundleError, QueryError, SearchResult, StudyNotFoundError

logger = logging.getLogger(__name__)

router = APIRouter(prefix=DEFAULT_BASE, include_in_schema=False)
templates = Environment(loader=PackageLoader("dicom_node.api.ui", "templates"),
                        autoescape=select_autoescape(default=True, default_for_string=True))
RECENT_STUDIES = 24
NO_STORE = {"Cache-Control": "no-store"}  # pages show patient data: never kept by a browser or proxy


def install(app: FastAPI) -> None:
    """Add the pages, their stylesheet (``/ui/static/ui.css``) and the answers to unauthenticated browsers."""
    from importlib.resources import files

    app.mount(f"{DEFAULT_BASE}/static", StaticFiles(directory=str(files("dicom_node.api.ui") / "static")),
              name="ui-static")
    app.include_router(router)

    async def to_login(request: Request, error: Exception) -> Response:
        assert isinstance(error, LoginRequired)
        return RedirectResponse(login_location(request, error.next_path), status_code=303, headers=NO_STORE)

    async def refused(request: Request, error: Exception) -> Response:
        assert isinstance(error, Refused)
        return _page(request, "error.html", error.status, title="Not allowed", message=error.message)

    app.add_exception_handler(LoginRequired, to_login)
    app.add_exception_handler(Refused, refused)


# --- rendering --------------------------------------------------------------------------------------------


def _page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    base = base_of(request)
    html = templates.get_template(template).render(base=base, css=f"{base}/static/ui.css", **context)
    return HTMLResponse(html, status_code=status, headers=NO_STORE)


def _indexed(api: ApiServices) -> int:
    if not api.engine.ready:  # no bundle yet: nothing indexed
        return 0
    return int(api.engine.describe().get("indexed_studies") or 0)


def _orthanc_urls(request: Request, api: ApiServices, study_uids: list[str]) -> dict[str, str]:
    if api.orthanc is None or not study_uids:
        return {}
    same_origin = is_proxied(request)
    return {uid: api.orthanc.study_url(orthanc_id, same_origin=same_origin)
            for uid, orthanc_id in api.orthanc.lookup(study_uids).items()}


# --- filters from a form ----------------------------------------------------------------------------------


def _da(value: str | None) -> str | None:
    """An <input type=date> value (YYYY-MM-DD) as DICOM DA; blank as None; anything else left for the check."""
    value = (value or "").strip()
    if not value:
        return None
    return value.replace("-", "") if len(value) == 10 and value[4] == value[7] == "-" else value


def _filters(date_from: str | None, date_to: str | None, body_part: str | None) -> FilterFields:
    """Raises ValueError with a message a person can read."""
    part = (body_part or "").strip().upper() or None
    try:
        return FilterFields(study_date_from=_da(date_from), study_date_to=_da(date_to), body_part=part)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'filters'}: {e['msg']}"
                             for e in error.errors())
        raise ValueError(problems.replace("study_date_from", "date from").replace("study_date_to", "date to")) \
            from None


def _limit(api: ApiServices, value: str | None) -> int:
    if value is None or not value.strip():
        return api.settings.query.default_limit
    if not value.strip().isdigit() or not 1 <= int(value) <= api.settings.query.max_limit:
        raise ValueError(f"limit must be a whole number from 1 to {api.settings.query.max_limit}")
    return int(value)


def _form_values(limit: int, date_from: str | None, date_to: str | None, body_part: str | None) -> dict[str, Any]:
    return {"limit": limit, "date_from": (date_from or "").strip(), "date_to": (date_to or "").strip(),
            "body_part": (body_part or "").strip()}


def _empty_message(api: ApiServices, filters: FilterFields) -> str:
    indexed = _indexed(api)
    counted = f"{indexed} {'study' if indexed == 1 else 'studies'} indexed"
    if filters.search_filters() is not None:
        return f"No similar studies match these filters ({counted})."
    return f"No similar studies yet: {counted}."


def _refused(request: Request, audited: Any, error: QueryError) -> HTMLResponse:
    """The page for a query the engine refused: 503 while no bundle is active (the query is fine), else 422."""
    status, title = (503, "Not ready to search") if isinstance(error, NoBundleError) else (422, "Cannot search")
    audited.status = status
    return _page(request, "error.html", status, title=title, message=str(error))


# --- pages ------------------------------------------------------------------------------------------------


@router.get("")
def root(request: Request) -> Response:
    return RedirectResponse(f"{base_of(request)}/", status_code=303)


@router.get("/")
def landing(request: Request) -> Response:
    who = viewer(request)
    api = services(request)
    with api.audit.record(who.name, who.client, "studies", {"interface": "ui", "limit": RECENT_STUDIES}) as audited:
        rows = sorted(api.store.studies(), key=lambda row: row.last_received, reverse=True)[:RECENT_STUDIES]
        attributes = {a.study_uid: a for a in api.store.all_study_attributes()}
        cards = [study_card(api, row.study_uid, attributes.get(row.study_uid), None, None) for row in rows]
        audited.results = [card.study_uid for card in cards]
        return _page(request, "landing.html", viewer=who, cards=cards, indexed=_indexed(api),
                     form=_form_values(api.settings.query.default_limit, None, None, None),
                     max_limit=api.settings.query.max_limit)


@router.get("/login")
def login_form(request: Request, next: str | None = None, reason: str | None = None) -> Response:
    notice = {"link": "That link has expired or is not valid. Sign in with a token, or ask for a new link.",
              "logout": "You are signed out."}.get(reason or "")
    return _page(request, "login.html", next=safe_next(next, base_of(request)), notice=notice, error=None)


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=512)] = "",
          next: Annotated[str, Form(max_length=2048)] = "") -> Response:
    api = services(request)
    base = base_of(request)
    record = api.tokens.authenticate(token.strip()) if token.strip() else None
    error = None
    if record is None:
        error = "That token is not valid (unknown or revoked)."
    elif not record.allows(Scope.READ):
        error = f"The token {record.name!r} lacks the 'read' scope these pages need."
    if error is not None or record is None:
        logger.info("event=ui_login_refused client=%s", client_of(request))
        return _page(request, "login.html", next=safe_next(next, base), notice=None, error=error)
    key = ui_key(api)
    session = signing.Session(record.name, signing.token_fingerprint(key, record.sha256),
                              int(time.time()) + api.settings.ui.session_ttl_s)
    response = RedirectResponse(safe_next(next, base), status_code=303, headers=NO_STORE)
    response.set_cookie(**session_cookie(api, session, base))  # type: ignore[arg-type]
    logger.info("event=ui_login token=%s client=%s", record.name, client_of(request))
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    base = base_of(request)
    response = RedirectResponse(f"{base}/login?reason=logout", status_code=303, headers=NO_STORE)
    response.delete_cookie(COOKIE, path=base, httponly=True, samesite="strict")
    return response


@router.get("/studies/{uid}/similar")
def similar_page(request: Request, uid: str, limit: str | None = None, date_from: str | None = None,
                 date_to: str | None = None, body_part: str | None = None) -> Response:
    api = services(request)
    if "sig" in request.query_params or "exp" in request.query_params:
        return _open_signed_link(request, api, uid)
    who = viewer(request)
    try:
        uid = check_uid(uid, "StudyInstanceUID")
        chosen = _limit(api, limit)
        filters = _filters(date_from, date_to, body_part)
    except (InvalidUIDError, ValueError) as error:
        return _page(request, "error.html", 422, title="Cannot search", message=str(error))
    form = _form_values(chosen, date_from, date_to, body_part)
    parameters = {"interface": "ui", "study_uid": uid, "limit": chosen, **filters.model_dump(exclude_none=True)}
    with api.audit.record(who.name, who.client, "similar", parameters) as audited:
        try:
            result = api.engine.similar_to_study(uid, limit=chosen, filters=filters.search_filters())
        except StudyNotFoundError:
            audited.status = 404
            return _page(request, "error.html", 404, title="Study not on this node",
                         message=f"This node does not hold study {uid} (yet). A study appears here once it has "
                                 "been sent to the node and indexed.")
        except QueryError as error:  # NoBundleError included
            return _refused(request, audited, error)
        audited.results = [hit.study_uid for hit in result.hits]
    links = _orthanc_urls(request, api, [uid, *audited.results])
    query_card = study_card(api, uid, api.store.study_attributes(uid), _body_part_of(api, uid), links.get(uid))
    return _results(request, api, who, result, links, form, filters, query_card=query_card, text="")


@router.post("/search")
def search_page(request: Request, text: Annotated[str, Form(max_length=100_000)] = "",
                limit: Annotated[str | None, Form()] = None, date_from: Annotated[str | None, Form()] = None,
                date_to: Annotated[str | None, Form()] = None,
                body_part: Annotated[str | None, Form()] = None) -> Response:
    who = viewer(request)
    api = services(request)
    try:
        if not text.strip():
            raise ValueError("Type a finding or paste a report to search by text.")
        chosen = _limit(api, limit)
        filters = _filters(date_from, date_to, body_part)
    except ValueError as error:
        return _page(request, "error.html", 422, title="Cannot search", message=str(error))
    form = _form_values(chosen, date_from, date_to, body_part)
    parameters = {"interface": "ui", "text": text, "limit": chosen,  # the text included: see audit.py
                  **filters.model_dump(exclude_none=True)}
    with api.audit.record(who.name, who.client, "search", parameters) as audited:
        try:
            result = api.engine.search_text(text, limit=chosen, filters=filters.search_filters())
        except QueryError as error:  # NoBundleError included
            return _refused(request, audited, error)
        audited.results = [hit.study_uid for hit in result.hits]
    links = _orthanc_urls(request, api, audited.results)
    return _results(request, api, who, result, links, form, filters, query_card=None, text=text)


@router.get("/thumbnails/{uid}.png")
def thumbnail(request: Request, uid: str) -> Response:
    try:
        who = viewer(request)
    except LoginRequired:  # an <img>: no page to redirect to
        return Response("sign in first", status_code=401, media_type="text/plain")
    api = services(request)
    with api.audit.record(who.name, who.client, "thumbnail", {"interface": "ui", "study_uid": uid,
                                                             "window": api.settings.ui.thumbnail_window}) as audited:
        data = thumbnail_png(api, uid, api.settings.ui.thumbnail_window)
        if data is None:
            audited.status = 404
            return Response("no image of this study on this node", status_code=404, media_type="text/plain")
        audited.results = [uid]
        return png_response(data)


# --- helpers ----------------------------------------------------------------------------------------------


def _results(request: Request, api: ApiServices, who: Viewer, result: SearchResult, links: dict[str, str],
             form: dict[str, Any], filters: FilterFields, *, query_card: Card | None, text: str) -> Response:
    return _page(request, "results.html", viewer=who, query=query_card, text=text, form=form,
                 cards=result_cards(api, result, links), empty=_empty_message(api, filters),
                 ranking=result.query.get("ranking"), max_limit=api.settings.query.max_limit,
                 snippets=api.settings.query.return_report_snippets, bundle_id=result.bundle_id)


def _body_part_of(api: ApiServices, uid: str) -> str | None:
    """The query study's BodyPartExamined as indexed (its payload), when it is indexed."""
    point = api.engine.stored_point(uid)
    if point is None or not point.vectors.get(IMAGE_VECTOR):
        return None
    value = point.payload.get("body_part")
    return str(value) if value else None


def _open_signed_link(request: Request, api: ApiServices, uid: str) -> Response:
    """A valid link opens a session (as long as the link lives) and goes to the clean URL; else the login form."""
    base = base_of(request)
    rest = [(k, v) for k, v in request.query_params.multi_items() if k not in ("exp", "sig")]
    clean = f"{base}/studies/{uid}/similar" + (f"?{urlencode(rest)}" if rest else "")
    key = ui_key(api)
    expires = signing.check_link(key, uid, request.query_params.get("exp"), request.query_params.get("sig"))
    if expires is None:
        logger.info("event=ui_link_refused client=%s", client_of(request))
        return RedirectResponse(login_location(request, clean, "link"), status_code=303, headers=NO_STORE)
    session = signing.Session(signing.LINK_PRINCIPAL, None,
                              min(expires, int(time.time()) + api.settings.ui.session_ttl_s))
    response = RedirectResponse(clean, status_code=303, headers=NO_STORE)
    response.set_cookie(**session_cookie(api, session, base))  # type: ignore[arg-type]
    logger.info("event=ui_link_opened study_uid=%s client=%s", uid, client_of(request))
    return response
