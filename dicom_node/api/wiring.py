"""The node's REST API from its parts: ``start_api(node)`` builds the services, the app and the server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicom_node.api.app import create_app
from dicom_node.api.audit import AuditLog, audit_path
from dicom_node.api.orthanc_links import OrthancLinks
from dicom_node.api.server import ApiServer
from dicom_node.api.services import ApiServices
from dicom_node.api.tokens import TokenStore, tokens_path
from dicom_node.metrics import node_collections
from dicom_node.report.thumbnails import ThumbnailCache
from dicom_node.tls import server_context

if TYPE_CHECKING:
    from dicom_node.node import Node


def start_api(node: Node) -> ApiServer | None:
    """Serve the API on ``api.http_bind:api.http_port`` (None when the port is 0: off)."""
    settings = node.settings
    if not settings.api.http_port:
        return None
    services = ApiServices(engine=node.query_engine, store=node.store, attach_report=node.attach_report,
                           tokens=TokenStore(tokens_path(node.layout.root)),
                           audit=AuditLog(audit_path(node.layout.root)), settings=settings,
                           layout=node.layout, reports=node.reports,
                           thumbnails=ThumbnailCache(node.layout.thumbnails),
                           orthanc=OrthancLinks(settings.orthanc) if settings.orthanc.url else None,
                           collections=lambda: node_collections(node))
    server = ApiServer(create_app(services), settings.api.http_bind, settings.api.http_port,
                       tls=server_context(settings.node.tls) if settings.api.https else None)
    server.start()
    return server
