"""The REST API application: ``create_app(services)`` wires the routes under ``/api/v1``, the open health check
and the error mapping; OpenAPI at ``/openapi.json``, the interactive page at ``/docs`` (offline: ``docs``); the
"Similar cases" pages under ``/ui`` (``dicom_node.api.ui``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dicom_node.api import routes_metrics, routes_reports, routes_search, routes_studies
from dicom_node.api.docs import add_offline_docs
from dicom_node.api.models import Health
from dicom_node.api.services import ApiServices, Engine
from dicom_node.api.ui import routes as ui_routes
from workers.dicom_uids import InvalidUIDError
from workers.search import NoBundleError, QueryError, StudyNotFoundError

logger = logging.getLogger(__name__)

PREFIX = "/api/v1"


def create_app(services: ApiServices) -> FastAPI:
    app = FastAPI(title="MedFinder Node", version="1", docs_url=None, redoc_url=None,
                  description="Similar-case search over the studies this node holds: by study, by report or "
                              "free text. Bearer tokens from `medfinder token create` (scopes read, report, "
                              "admin); every query and report write is audited.")
    app.state.services = services
    add_offline_docs(app)
    api = APIRouter(prefix=PREFIX)
    api.include_router(routes_studies.router)
    api.include_router(routes_search.router)
    api.include_router(routes_reports.router)
    api.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health, tags=["health"],
                      summary="Liveness, the active bundle and how many studies are indexed (no token)")
    app.include_router(api)
    ui_routes.install(app)
    routes_metrics.install(app)  # GET /metrics (api.metrics) and the REST/page query timing
    # Safety nets: the routes map these themselves; an error that escapes one is still the client's, not a 500.
    app.add_exception_handler(NoBundleError, _status(503))  # registered first: it is a QueryError too
    app.add_exception_handler(StudyNotFoundError, _status(404))
    app.add_exception_handler(QueryError, _status(422))
    app.add_exception_handler(InvalidUIDError, _status(422))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    return app


def healthz(engine: Engine) -> JSONResponse:
    if not engine.ready:  # alive (receiving, storing), but nothing to search with yet
        return JSONResponse(Health(status="no_bundle").model_dump())
    try:
        described = engine.describe()
    except Exception:  # noqa: BLE001 - a health check reports, it does not raise
        logger.exception("event=api_health_error")
        return JSONResponse(Health(status="degraded").model_dump(), status_code=503)
    return JSONResponse(Health(status="ok", bundle_id=described.get("bundle_id"),
                               indexed=described.get("indexed_studies")).model_dump())


async def _invalid_request(_request: Request, error: Exception) -> JSONResponse:
    """422 without echoing the input: FastAPI's own handler does, and an input JSON cannot carry (a float
    overflowing to inf) turned a malformed body into a 500; a request's text may also hold patient data."""
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    detail = [{"type": str(item.get("type", "")), "loc": [str(part) for part in item.get("loc", ())],
               "msg": str(item.get("msg", ""))} for item in errors]
    return JSONResponse({"detail": detail}, status_code=422)


def _status(code: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A Starlette exception handler answering ``code`` with the error's message."""

    async def handler(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=code)

    return handler
