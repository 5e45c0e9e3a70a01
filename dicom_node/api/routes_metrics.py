"""``GET /metrics`` (Prometheus text format) and the timing of REST and page queries.

``api.metrics`` decides who may scrape: ``open`` (no token: the metrics are counts, states, sizes and latencies,
never a UID or a name), ``token`` (a bearer token with the ``read`` scope, as Prometheus' ``authorization``
setting sends it) or ``off`` (no route: 404). Query latency is measured here for the REST API and the pages, by a
small ASGI middleware around the search and listing routes (C-FIND is timed by its own handler).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Depends, FastAPI, Response
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicom_node.api import routes_search, routes_studies
from dicom_node.api.auth import require
from dicom_node.api.services import ApiServices
from dicom_node.api.tokens import Scope as TokenScope
from dicom_node.api.ui import routes as ui_routes
from dicom_node.metrics import CollectionsProbe, CollectionView, metrics_registry, observe_query
from dicom_node.metrics.events import Interface, QueryKind

# The routes whose requests are queries: endpoint -> (interface, kind).
QUERY_ROUTES: dict[Callable[..., object], tuple[Interface, QueryKind]] = {
    routes_search.similar: ("rest", "similar"),
    routes_search.search: ("rest", "search"),
    routes_studies.list_studies: ("rest", "studies"),
    ui_routes.similar_page: ("ui", "similar"),
    ui_routes.search_page: ("ui", "search"),
}


def install(app: FastAPI) -> None:
    """Add the query timing and, unless ``api.metrics`` is ``off``, the ``/metrics`` route."""
    services: ApiServices = app.state.services
    app.add_middleware(QueryTimer)
    mode = services.settings.api.metrics
    if mode == "off":
        return
    registry = metrics_registry(services.store.path, services.data_dir(),
                                services.collections or _serving_collection(services))

    # Sync: the scrape reads SQLite and the index in the thread pool. Text format 0.0.4: what every Prometheus
    # (2.x too) reads; our names need nothing newer.
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    dependencies = [Depends(require(TokenScope.READ))] if mode == "token" else []
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=dependencies, tags=["metrics"],
                      response_class=Response, summary="Prometheus metrics (api.metrics: open, token or off)")


def _serving_collection(services: ApiServices) -> CollectionsProbe:
    """For an API built without the node (a benchmark): the query engine's collection only."""

    def probe() -> list[CollectionView]:
        engine = services.engine
        if not engine.ready:
            return []
        return [CollectionView(services.settings.index.collection, engine.bundle_id, "active", engine.index)]

    return probe


class QueryTimer:
    """Times the requests of :data:`QUERY_ROUTES`: latency when answered 2xx, a failure count otherwise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaped

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = QUERY_ROUTES.get(scope.get("endpoint"))  # set by the router once a route matched
            if route is not None:
                observe_query(route[0], route[1], time.perf_counter() - started, ok=200 <= status < 300)
