"""Vector index backends behind one small interface (:class:`VectorIndex`).

``edge`` (default): Qdrant's engine in the node process, on disk under ``<data>/index/<collection>``.
``qdrant``: a Qdrant server through qdrant-client (``index.url``), for production clusters.
The backend modules are imported on demand, so a process only loads the client library it uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from config import Settings
from workers.index.base import (IMAGE_VECTOR, REPORT_VECTOR, IndexMismatchError, Match, SearchFilters, StoredPoint,
                                VectorIndex, point_id_for)

if TYPE_CHECKING:
    from workers.index.catalog import IndexCatalog

__all__ = ["IMAGE_VECTOR", "REPORT_VECTOR", "IndexMismatchError", "Match", "SearchFilters", "StoredPoint",
           "VectorIndex", "open_catalog", "open_index", "point_id_for"]


def open_index(settings: Settings, folder: Path) -> VectorIndex:
    """The configured backend; call ``ensure_collection(bundle_id, dim)`` on it before use.

    ``folder``: where the edge backend keeps its shards (one sub-folder per collection). Both backends take the
    scale settings of ``settings.index`` (HNSW m/ef_construct/ef, int8 quantisation, rescoring, oversampling,
    on-disk vectors, RRF k; edge also the background-build threshold ``optimize_after_points``).
    """
    index = settings.index
    if index.backend == "edge":
        from workers.index.edge import EdgeIndex

        return EdgeIndex(folder / index.collection, index)
    from workers.index.server import ServerIndex

    assert index.url is not None  # the settings validator requires it for this backend
    return ServerIndex(index.url, index.collection, api_key=index.api_key, settings=index)


def open_catalog(settings: Settings, folder: Path) -> "IndexCatalog":
    """The collections of the configured backend, one per bundle, and its active pointer (``catalog``): what the
    node uses, so a model upgrade can fill a new collection while the active one serves."""
    from workers.index.catalog import EdgeCatalog, ServerCatalog

    index = settings.index
    if index.backend == "edge":
        return EdgeCatalog(folder, index)
    assert index.url is not None  # the settings validator requires it for this backend
    return ServerCatalog(index.url, index, api_key=index.api_key)
