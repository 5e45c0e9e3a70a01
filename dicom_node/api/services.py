"""What the REST API needs from the node, handed to :func:`~dicom_node.api.app.create_app` as one typed object,
and the FastAPI dependencies that give each route its part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from dicom_node.api.audit import AuditLog
from dicom_node.api.orthanc_links import OrthancLinks
from dicom_node.api.tokens import TokenStore
from dicom_node.metrics import CollectionsProbe
from dicom_node.report.thumbnails import ThumbnailCache
from dicom_node.store.layout import NodeLayout
from dicom_node.store.reports import ReportStore
from dicom_node.store.state import StateStore
from workers.search import QueryEngine

# node.attach_report(study_uid, text, source): raises QueryError for an empty text.
AttachReport = Callable[[str, str, str], None]


@dataclass(frozen=True)
class ApiServices:
    engine: QueryEngine
    store: StateStore
    attach_report: AttachReport
    tokens: TokenStore
    audit: AuditLog
    settings: Settings
    # The pages and thumbnails (None: a bare API, as the search benchmark builds it; the pages then use
    # settings.paths.data_dir, show no thumbnails, snippets or Orthanc links).
    layout: NodeLayout | None = None
    reports: ReportStore | None = None
    thumbnails: ThumbnailCache | None = None
    orthanc: OrthancLinks | None = None  # None when orthanc.url is not set
    collections: CollectionsProbe | None = None  # every collection kept, for /metrics (None: the engine's)

    def data_dir(self) -> Path:
        return self.layout.root if self.layout is not None else Path(self.settings.paths.data_dir)


def services(request: Request) -> ApiServices:
    return request.app.state.services


def _engine(request: Request) -> QueryEngine:
    return services(request).engine


def _store(request: Request) -> StateStore:
    return services(request).store


def _attach_report(request: Request) -> AttachReport:
    return services(request).attach_report


def _audit(request: Request) -> AuditLog:
    return services(request).audit


def _settings(request: Request) -> Settings:
    return services(request).settings


Services = Annotated[ApiServices, Depends(services)]
Engine = Annotated[QueryEngine, Depends(_engine)]
Store = Annotated[StateStore, Depends(_store)]
ReportAttacher = Annotated[AttachReport, Depends(_attach_report)]
Audit = Annotated[AuditLog, Depends(_audit)]
NodeSettings = Annotated[Settings, Depends(_settings)]
