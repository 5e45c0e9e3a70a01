"""What the edge backend asks of qdrant-edge: the shard configuration from the settings, opening a shard with its
payload indexes, filters and search parameters, and copying points from one shard to another.

Choices, measured on 2 cores with 512-d clustered vectors (benchmarks/search.py):

* Payload indexes are created with ``enable_hnsw=False``. With it on, Qdrant builds an extra HNSW sub-graph per
  value of every indexed field at optimisation time (here bundle_id, modality, body part, sex, age band,
  institution: each sums to a full graph), which made the build 6x slower (50k points: 58 s vs 9.6 s).
* Filtered searches use ACORN instead (``SearchParams(acorn=...)``) whenever the estimated selectivity is below
  ``ACORN_MAX_SELECTIVITY``: with a 10 % filter and no sub-graphs plain HNSW found 16 % of the exact top-10 (50k),
  ACORN 100 %; at 100k with a same-modality filter (CT ~70 % of the studies) recall@10 rose from 0.96 (Qdrant's
  default threshold 0.4) to 0.996 at 0.8, p95 2 ms. Exclusion-only filters (own study, own patient) stay on plain
  HNSW, which finds 0.998 of the exact top-10 there.
* int8 scalar quantisation is applied to ``image`` only, and ``report`` is always on disk: a non-appendable
  segment stores every named vector densely for every point, so a quantised or RAM-cached ``report`` would hold
  0.5-2 KB of RAM per study whether or not it has a report; report searches read the vectors their HNSW path
  visits instead.
* The keyword indexes of the one-per-study fields (study UID, patient pseudonym: used only to exclude one value)
  and the point-id tracker stay on disk (``Memory.Cold``): serving RAM at 100k with int8 fell from 1.28 to 0.83 KB
  per study, search latency unchanged.
* ``indexing_threshold`` is 1 KB: when the node decides to build (``index.optimize_after_points``), every segment
  is indexed, not only those above Qdrant's default 10 MB.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from config.settings import IndexSettings
from workers.index.base import IMAGE_VECTOR, INDEXED_FIELDS, STUDY_DAY_FIELD, VECTOR_NAMES, PayloadConditions

logger = logging.getLogger(__name__)

FULL_SCAN_THRESHOLD_KB = 10_000  # Qdrant's default: below this many KB of vectors a filtered search scans
INDEXING_THRESHOLD_KB = 1
ACORN_MAX_SELECTIVITY = 0.9  # filters keeping less than 90 % of the points: ACORN
COPY_BATCH = 512
UNIQUE_FIELDS = ("study_uid", "patient_pseudonym")  # one value per study: their indexes stay on disk


def vector_params(dim: int, settings: IndexSettings, name: str) -> Any:
    """``image``: quantised with int8, on disk with ``vectors_on_disk``; ``report``: never quantised, always on
    disk (mmapped: a search reads the vectors its HNSW path visits; studies without a report cost disk only)."""
    quantization = None
    if name == IMAGE_VECTOR and settings.quantization == "int8":
        quantization = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99, memory=qe.Memory.Pinned)
    on_disk = settings.vectors_on_disk or name != IMAGE_VECTOR
    return qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine, quantization_config=quantization,
                               memory=qe.Memory.Cold if on_disk else None)


def shard_config(dim: int, settings: IndexSettings, names: Iterable[str] = VECTOR_NAMES) -> Any:
    """The shard configuration of a collection of ``dim``-d vectors under ``settings`` (named vectors ``names``)."""
    return qe.EdgeConfig(
        vectors={name: vector_params(dim, settings, name) for name in names},
        hnsw_config=qe.HnswIndexConfig(m=settings.hnsw_m, ef_construct=settings.hnsw_ef_construct,
                                       full_scan_threshold=FULL_SCAN_THRESHOLD_KB),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=INDEXING_THRESHOLD_KB),
        id_tracker_memory=qe.Memory.Cold,
    )


class ShardLockedError(RuntimeError):
    """Another process holds the shard (qdrant-edge allows one owner)."""


def open_shard(path: Path, config: Any, *, create: bool) -> Any:
    """Load (applying ``config``: HNSW, quantisation and memory settings take effect) or create a shard, with the
    payload indexes searches filter on."""
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            shard = qe.EdgeShard.create(str(path), config)
        else:
            shard = qe.EdgeShard.load(str(path), config)
    except Exception as error:
        if "WouldBlock" in str(error):
            raise ShardLockedError(f"index {path} is already open in another process; qdrant-edge allows one "
                                   "owner (run one node per data folder)") from error
        raise
    create_payload_indexes(shard)
    return shard


def create_payload_indexes(shard: Any) -> None:
    """Keyword indexes on the filtered fields and an integer range index on the study day (idempotent)."""
    for field in INDEXED_FIELDS:
        memory = qe.Memory.Cold if field in UNIQUE_FIELDS else None
        shard.update(qe.UpdateOperation.create_field_index(field, qe.KeywordIndexParams(enable_hnsw=False,
                                                                                        memory=memory)))
    shard.update(qe.UpdateOperation.create_field_index(
        STUDY_DAY_FIELD, qe.IntegerIndexParams(lookup=False, range=True, enable_hnsw=False)))


def edge_filter(conditions: PayloadConditions | None) -> Any:
    """The qdrant-edge filter for ``conditions`` (None = no filter)."""
    if conditions is None:
        return None
    must: list[Any] = [qe.FieldCondition(key=key, match=qe.MatchValue(value)) for key, value in conditions.equal]
    if conditions.has_range:
        must.append(qe.FieldCondition(key=STUDY_DAY_FIELD, range=qe.RangeFloat(
            gte=conditions.day_from, lte=conditions.day_to)))
    must_not = [qe.FieldCondition(key=key, match=qe.MatchValue(value)) for key, value in conditions.not_equal]
    return qe.Filter(must=must or None, must_not=must_not or None)


def search_params(settings: IndexSettings, *, exact: bool = False) -> Any:
    """Approximate search with the configured ef, rescoring and oversampling; or exact search on the original
    vectors (the recall reference: exact alone would still score with the quantised copy)."""
    if exact:
        return qe.SearchParams(exact=True, quantization=qe.QuantizationSearchParams(ignore=True))
    quantization = None
    if settings.quantization == "int8":
        quantization = qe.QuantizationSearchParams(rescore=settings.rescore, oversampling=settings.oversampling)
    return qe.SearchParams(hnsw_ef=settings.hnsw_ef, quantization=quantization,
                           acorn=qe.AcornSearchParams(enable=True, max_selectivity=ACORN_MAX_SELECTIVITY))


def canonical_id(point_id: Any) -> str:
    """A point id as the engine gives it back (a UUID in its canonical lower-case form)."""
    try:
        return str(uuid.UUID(str(point_id)))
    except ValueError:
        return str(point_id)


def as_point(record: Any) -> Any:
    """A scrolled or retrieved record as a point to upsert elsewhere (all its vectors and its payload)."""
    return qe.Point(record.id, dict(record.vector or {}), dict(record.payload or {}))


def copy_points(source: Any, target: Any, batch: int = COPY_BATCH) -> int:
    """Copy every point of ``source`` (vectors and payload) into ``target`` by scrolling; returns how many."""
    copied = 0
    offset = None
    while True:
        records, offset = source.scroll(qe.ScrollRequest(offset=offset, limit=batch, with_payload=True,
                                                         with_vector=True))
        if records:
            target.update(qe.UpdateOperation.upsert_points([as_point(record) for record in records]))
            copied += len(records)
        if offset is None:
            return copied


def copy_ids(source: Any, target: Any, point_ids: Iterable[str], batch: int = COPY_BATCH) -> int:
    """Make ``target`` hold what ``source`` holds for ``point_ids`` (written, or deleted); returns how many."""
    ids = [canonical_id(point_id) for point_id in point_ids]
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        records = source.retrieve(chunk, with_payload=True, with_vector=True)
        if records:
            target.update(qe.UpdateOperation.upsert_points([as_point(record) for record in records]))
        found = {canonical_id(record.id) for record in records}
        missing = [point_id for point_id in chunk if point_id not in found]
        if missing:
            target.update(qe.UpdateOperation.delete_points(missing))
    return len(ids)
