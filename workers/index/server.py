"""The scale-out index: a Qdrant server (or cluster) through qdrant-client.

``settings.index.url`` is a server URL (``http://host:6333``) in production. ``":memory:"`` or a folder path
select qdrant-client's *local mode*, an in-process numpy stand-in that speaks the same API; the tests use it
because no Qdrant server can run on the development machines. Local mode is for tests only: it is
brute force, ignores payload indexes and locks its folder to one client.

The bundle id and dimension are recorded in the collection's own ``metadata`` (a collection field since
Qdrant 1.16, stored by qdrant-client 1.20 in local mode too), so every client of a shared server sees them.
A server too old to keep metadata is refused with a clear error rather than used unchecked.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from qdrant_client import QdrantClient, models

from workers.index.base import (INDEXED_FIELDS, IndexMismatchError, Match, check_identity, check_request,
                                checked_vector)

logger = logging.getLogger(__name__)

VECTOR_NAME = "image"
BUNDLE_KEY = "medfinder_bundle_id"
DIM_KEY = "medfinder_dim"


def make_client(url: str, api_key: str | None = None, timeout_s: int = 30) -> QdrantClient:
    """A client for a server URL, or local mode for ``":memory:"`` / a folder path (tests)."""
    if url == ":memory:":
        return QdrantClient(location=":memory:")
    if url.startswith(("http://", "https://")):
        return QdrantClient(url=url, api_key=api_key, timeout=timeout_s)
    return QdrantClient(path=url)


class ServerIndex:
    """A :class:`~workers.index.base.VectorIndex` on collection ``collection`` of a Qdrant server."""

    def __init__(self, url: str, collection: str, *, api_key: str | None = None, hnsw_ef: int = 128) -> None:
        self.url = url
        self.collection = collection
        self.hnsw_ef = int(hnsw_ef)
        self._client: QdrantClient | None = make_client(url, api_key)
        # Local mode is brute force and warns about search params it cannot use.
        self._search_params = (models.SearchParams(hnsw_ef=self.hnsw_ef)
                               if url.startswith(("http://", "https://")) else None)
        self._dim: int | None = None
        self._lock = threading.Lock()

    def _require(self) -> QdrantClient:
        if self._client is None:
            raise RuntimeError("the index is closed")
        return self._client

    def _identity(self) -> tuple[str | None, int | None]:
        """The bundle id and dimension the existing collection records."""
        info = self._require().get_collection(self.collection)
        metadata = info.config.metadata or {}
        bundle, dim = metadata.get(BUNDLE_KEY), metadata.get(DIM_KEY)
        return (str(bundle) if bundle is not None else None), (int(dim) if isinstance(dim, int) else None)

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        check_request(bundle_id, dim)
        dim = int(dim)
        with self._lock:
            client = self._require()
            if not client.collection_exists(self.collection):
                try:
                    client.create_collection(
                        self.collection,
                        vectors_config={VECTOR_NAME: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
                        metadata={BUNDLE_KEY: bundle_id, DIM_KEY: dim},
                    )
                    logger.info("event=index_created backend=qdrant collection=%s bundle_id=%s dim=%d",
                                self.collection, bundle_id, dim)
                except Exception:  # another node created it meanwhile: check what it recorded below
                    if not client.collection_exists(self.collection):
                        raise
            found_bundle, found_dim = self._identity()
            if found_bundle is None and found_dim is None:
                raise IndexMismatchError(
                    f"collection {self.collection!r} records no MedFinder bundle (made by something else, or a "
                    "Qdrant server older than 1.16 that drops collection metadata); refusing to use it")
            check_identity(found_bundle, found_dim, bundle_id, dim, f"collection {self.collection!r}")
            with warnings.catch_warnings():  # local mode warns that payload indexes have no effect there
                warnings.simplefilter("ignore")
                for field in INDEXED_FIELDS:
                    client.create_payload_index(self.collection, field, models.PayloadSchemaType.KEYWORD)
            self._dim = dim

    def upsert(self, point_id: str, vector: Sequence[float], payload: dict) -> None:
        values = checked_vector(vector, self._dim)
        with self._lock:
            self._require().upsert(self.collection, points=[
                models.PointStruct(id=str(point_id), vector={VECTOR_NAME: values}, payload=dict(payload))], wait=True)

    def search(self, vector: Sequence[float], limit: int, *, exclude_study_uid: str | None = None,
               exclude_patient: str | None = None) -> list[Match]:
        values = checked_vector(vector, self._dim)
        if limit < 1:
            return []
        must_not: list[Any] = []
        if exclude_study_uid:
            must_not.append(models.FieldCondition(key="study_uid", match=models.MatchValue(value=exclude_study_uid)))
        if exclude_patient:
            must_not.append(models.FieldCondition(key="patient_pseudonym",
                                                  match=models.MatchValue(value=exclude_patient)))
        with self._lock:
            response = self._require().query_points(
                self.collection, query=values, using=VECTOR_NAME, limit=int(limit),
                query_filter=models.Filter(must_not=must_not) if must_not else None,
                search_params=self._search_params, with_payload=True, with_vectors=False,
            )
        return [Match(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    def count(self) -> int:
        with self._lock:
            return int(self._require().count(self.collection, exact=True).count)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
