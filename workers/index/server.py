"""The scale-out index: a Qdrant server (or cluster) through qdrant-client.

``settings.index.url`` is a server URL (``http://host:6333``) in production. ``":memory:"`` or a folder path
select qdrant-client's *local mode*, an in-process numpy stand-in that speaks the same API; the tests use it
because no Qdrant server can run on the development machines. Local mode is for tests only: it is
brute force, ignores payload indexes and locks its folder to one client.

The bundle id and dimension are recorded in the collection's own ``metadata`` (a collection field since
Qdrant 1.16, stored by qdrant-client 1.20 in local mode too), so every client of a shared server sees them.
A server too old to keep metadata is refused with a clear error rather than used unchecked.

Named vectors ``image`` and ``report``; a collection made before ``report`` existed gets it added on open
(``create_vector_name``, Qdrant 1.18+), or a clear error says what to do. HNSW (m, ef_construct), int8 scalar
quantisation of ``image`` (rescoring, oversampling) and on-disk originals come from the same settings as the edge
backend; the server builds HNSW in its own background optimiser. Fused search is the server's own
``prefetch`` + parametrised RRF (``RrfQuery``), computed in Python only if a server rejects that query.

What local mode lacks (so the tests cannot cover it for this backend): HNSW and quantisation (it is exact brute
force; hnsw/quantisation configs are accepted and ignored, search params are not sent), payload indexes (no-ops).
It does implement named vectors, ``create_vector_name``, filters, offset, score thresholds and ``RrfQuery``.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from config.settings import IndexSettings
from workers.index.base import (IMAGE_VECTOR, INDEXED_FIELDS, REPORT_VECTOR, STUDY_DAY_FIELD, VECTOR_NAMES,
                                IndexMismatchError, Match, PayloadConditions, SearchFilters, StoredPoint,
                                check_identity, check_paging, check_request, checked_query_vectors, checked_using,
                                checked_vector, checked_vectors, fuse_rrf, payload_conditions, prefetch_depth)

logger = logging.getLogger(__name__)

ACORN_MAX_SELECTIVITY = 0.9  # as the edge backend (workers.index.edge_shard): ACORN for real filters
BUNDLE_KEY = "medfinder_bundle_id"
DIM_KEY = "medfinder_dim"


def make_client(url: str, api_key: str | None = None, timeout_s: int = 30) -> QdrantClient:
    """A client for a server URL, or local mode for ``":memory:"`` / a folder path (tests)."""
    if url == ":memory:":
        return QdrantClient(location=":memory:")
    if is_server_url(url):
        return QdrantClient(url=url, api_key=api_key, timeout=timeout_s)
    return QdrantClient(path=url)


def is_server_url(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def vector_params(dim: int, settings: IndexSettings, name: str) -> models.VectorParams:
    """Cosine vectors; int8 quantisation on ``image`` only, ``report`` always on disk (as the edge backend, see
    workers.index.edge_shard: every named vector is stored densely, report or not)."""
    quantization = None
    if name == IMAGE_VECTOR and settings.quantization == "int8":
        quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    on_disk = settings.vectors_on_disk or name != IMAGE_VECTOR
    return models.VectorParams(size=dim, distance=models.Distance.COSINE, on_disk=on_disk or None,
                               quantization_config=quantization)


def server_filter(conditions: PayloadConditions | None) -> models.Filter | None:
    if conditions is None:
        return None
    must: list[Any] = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                       for key, value in conditions.equal]
    if conditions.has_range:
        must.append(models.FieldCondition(key=STUDY_DAY_FIELD, range=models.Range(gte=conditions.day_from,
                                                                                  lte=conditions.day_to)))
    must_not: list[Any] = [models.FieldCondition(key=key, match=models.MatchValue(value=value))
                           for key, value in conditions.not_equal]
    return models.Filter(must=must or None, must_not=must_not or None)


def search_params(settings: IndexSettings, *, exact: bool = False) -> models.SearchParams:
    """What a server is asked to search with: ef, rescoring and oversampling, ACORN for selective filters; or exact
    search on the original vectors (the recall reference)."""
    if exact:
        return models.SearchParams(exact=True, quantization=models.QuantizationSearchParams(ignore=True))
    quantization = None
    if settings.quantization == "int8":
        quantization = models.QuantizationSearchParams(rescore=settings.rescore, oversampling=settings.oversampling)
    return models.SearchParams(hnsw_ef=settings.hnsw_ef, quantization=quantization,
                               acorn=models.AcornSearchParams(enable=True, max_selectivity=ACORN_MAX_SELECTIVITY))


class ServerIndex:
    """A :class:`~workers.index.base.VectorIndex` on collection ``collection`` of a Qdrant server."""

    def __init__(self, url: str, collection: str, *, api_key: str | None = None,
                 settings: IndexSettings | None = None, client: QdrantClient | None = None) -> None:
        self.url = url
        self.collection = collection
        self.settings = settings if settings is not None else IndexSettings()
        # ``client``: one shared by several collections (workers.index.catalog: local mode locks its folder to one
        # client, and aliases live in one client's view); closed by its owner, not by this index.
        self._owns_client = client is None
        self._client: QdrantClient | None = client if client is not None else make_client(url, api_key)
        # Local mode is brute force and warns about search params it cannot use: send them to servers only.
        self._server = is_server_url(url)
        self._dim: int | None = None
        self._fusion_in_python = False  # set when the server rejected RrfQuery (older than parametrised RRF)
        self._lock = threading.Lock()

    def _require(self) -> QdrantClient:
        if self._client is None:
            raise RuntimeError("the index is closed")
        return self._client

    def _search_params(self, exact: bool = False) -> models.SearchParams | None:
        return search_params(self.settings, exact=exact) if self._server else None

    def _identity(self) -> tuple[str | None, int | None]:
        """The bundle id and dimension the existing collection records."""
        info = self._require().get_collection(self.collection)
        metadata = info.config.metadata or {}
        bundle, dim = metadata.get(BUNDLE_KEY), metadata.get(DIM_KEY)
        return (str(bundle) if bundle is not None else None), (int(dim) if isinstance(dim, int) else None)

    def _create(self, bundle_id: str, dim: int) -> None:
        client = self._require()
        try:
            client.create_collection(
                self.collection,
                vectors_config={name: vector_params(dim, self.settings, name) for name in VECTOR_NAMES},
                hnsw_config=models.HnswConfigDiff(m=self.settings.hnsw_m, ef_construct=self.settings.hnsw_ef_construct),
                metadata={BUNDLE_KEY: bundle_id, DIM_KEY: dim},
            )
            logger.info("event=index_created backend=qdrant collection=%s bundle_id=%s dim=%d", self.collection,
                        bundle_id, dim)
        except Exception:  # another node created it meanwhile: check what it recorded below
            if not client.collection_exists(self.collection):
                raise

    def _ensure_report_vector(self, dim: int) -> None:
        """Add ``report`` to a collection made before it existed; a clear error where the server cannot."""
        vectors = self._require().get_collection(self.collection).config.params.vectors
        if not isinstance(vectors, dict) or IMAGE_VECTOR not in vectors:
            raise IndexMismatchError(f"collection {self.collection!r} has no named {IMAGE_VECTOR!r} vector; it was "
                                     "not made by MedFinder. Use another collection (index.collection)")
        if REPORT_VECTOR in vectors:
            return
        try:
            self._require().create_vector_name(
                self.collection, REPORT_VECTOR,
                models.DenseVectorNameConfig(dense=models.DenseVectorConfig(size=dim, distance=models.Distance.COSINE)))
        except (UnexpectedResponse, ValueError, NotImplementedError) as error:
            raise IndexMismatchError(
                f"collection {self.collection!r} has no {REPORT_VECTOR!r} vector (made before report search) and "
                f"the server could not add it ({error}). Upgrade the Qdrant server to 1.18 or newer, which adds a "
                "named vector to a live collection, or set index.collection to a new name and re-index") from error
        logger.info("event=index_vector_added backend=qdrant collection=%s vector=%s", self.collection, REPORT_VECTOR)

    def _create_payload_indexes(self) -> None:
        client = self._require()
        with warnings.catch_warnings():  # local mode warns that payload indexes have no effect there
            warnings.simplefilter("ignore")
            for field in INDEXED_FIELDS:  # enable_hnsw=False: no per-value sub-graphs (see edge_shard); ACORN
                client.create_payload_index(self.collection, field, models.KeywordIndexParams(
                    type=models.KeywordIndexType.KEYWORD, enable_hnsw=False))
            client.create_payload_index(self.collection, STUDY_DAY_FIELD, models.IntegerIndexParams(
                type=models.IntegerIndexType.INTEGER, lookup=False, range=True, enable_hnsw=False))

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        check_request(bundle_id, dim)
        dim = int(dim)
        with self._lock:
            if not self._require().collection_exists(self.collection):
                self._create(bundle_id, dim)
            found_bundle, found_dim = self._identity()
            if found_bundle is None and found_dim is None:
                raise IndexMismatchError(
                    f"collection {self.collection!r} records no MedFinder bundle (made by something else, or a "
                    "Qdrant server older than 1.16 that drops collection metadata); refusing to use it")
            check_identity(found_bundle, found_dim, bundle_id, dim, f"collection {self.collection!r}")
            self._ensure_report_vector(dim)
            self._create_payload_indexes()
            self._dim = dim

    def upsert(self, point_id: str, vectors: Mapping[str, Sequence[float]], payload: dict) -> None:
        """Insert or replace one point: a vector not given (``report``) is removed from the point."""
        values = checked_vectors(vectors, self._dim)
        with self._lock:
            self._require().upsert(self.collection, points=[
                models.PointStruct(id=str(point_id), vector=values, payload=dict(payload))], wait=True)

    def get(self, point_id: str) -> StoredPoint | None:
        with self._lock:
            records = self._require().retrieve(self.collection, [str(point_id)], with_payload=True,
                                               with_vectors=True)
        if not records:
            return None
        record = records[0]
        vectors = record.vector if isinstance(record.vector, dict) else {}
        return StoredPoint(str(record.id), {str(name): [float(v) for v in vector]  # type: ignore[union-attr]
                                            for name, vector in vectors.items()}, dict(record.payload or {}))

    def search(self, vector: Sequence[float], limit: int, *, using: str = IMAGE_VECTOR,
               filters: SearchFilters | None = None, offset: int = 0, min_score: float | None = None,
               exact: bool = False) -> list[Match]:
        checked_using(using)
        values = checked_vector(vector, self._dim)
        check_paging(limit, offset)
        if limit < 1:
            return []
        with self._lock:
            response = self._require().query_points(
                self.collection, query=values, using=using, limit=int(limit), offset=int(offset) or None,
                query_filter=server_filter(payload_conditions(filters)), score_threshold=min_score,
                search_params=self._search_params(exact), with_payload=True, with_vectors=False,
            )
        return [Match(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    def search_fused(self, vectors: Mapping[str, Sequence[float]], limit: int, *,
                     filters: SearchFilters | None = None, offset: int = 0) -> list[Match]:
        """The server's fusion: one prefetch per named vector, ``RrfQuery(k=index.rrf_k)`` over them."""
        queries = checked_query_vectors(vectors, self._dim)
        check_paging(limit, offset)
        if limit < 1:
            return []
        condition = server_filter(payload_conditions(filters))
        depth = prefetch_depth(limit, offset)
        if not self._fusion_in_python:
            prefetch = [models.Prefetch(query=query, using=name, limit=depth, filter=condition,
                                        params=self._search_params()) for name, query in queries.items()]
            fusion = models.RrfQuery(rrf=models.Rrf(k=self.settings.rrf_k))
            try:
                with self._lock:
                    response = self._require().query_points(
                        self.collection, prefetch=prefetch, query=fusion, query_filter=condition, limit=int(limit),
                        offset=int(offset) or None, with_payload=True, with_vectors=False)
                return [Match(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]
            except UnexpectedResponse as error:
                if error.status_code not in (400, 404, 422):
                    raise
                # A server older than parametrised RRF: fuse here, with the same arithmetic (base.fuse_rrf).
                logger.warning("event=index_fusion_fallback backend=qdrant collection=%s status=%s",
                               self.collection, error.status_code)
                self._fusion_in_python = True
        rankings = [self.search(query, depth, using=name, filters=filters) for name, query in queries.items()]
        return fuse_rrf(rankings, self.settings.rrf_k)[offset:offset + limit]

    def count(self) -> int:
        with self._lock:
            return int(self._require().count(self.collection, exact=True).count)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                if self._owns_client:
                    self._client.close()
                self._client = None
