"""Vector index backends behind one small interface (:class:`VectorIndex`).

``edge`` (default): Qdrant's engine in the node process, on disk under ``<data>/index/<collection>``.
``qdrant``: a Qdrant server through qdrant-client (``index.url``), for production clusters.
The backend modules are imported on demand, so a process only loads the client library it uses.
"""

from __future__ import annotations

from pathlib import Path

from config import Settings
from workers.index.base import IndexMismatchError, Match, VectorIndex, point_id_for

__all__ = ["IndexMismatchError", "Match", "VectorIndex", "open_index", "point_id_for"]


def open_index(settings: Settings, folder: Path) -> VectorIndex:
    """The configured backend; call ``ensure_collection(bundle_id, dim)`` on it before use.

    ``folder``: where the edge backend keeps its shards (one sub-folder per collection).
    """
    index = settings.index
    if index.backend == "edge":
        from workers.index.edge import EdgeIndex

        return EdgeIndex(folder / index.collection, hnsw_ef=index.hnsw_ef)
    from workers.index.server import ServerIndex

    assert index.url is not None  # the settings validator requires it for this backend
    return ServerIndex(index.url, index.collection, api_key=index.api_key, hnsw_ef=index.hnsw_ef)
