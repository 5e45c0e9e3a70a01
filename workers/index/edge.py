"""The embedded default index: Qdrant's own engine in this process (qdrant-edge), on disk, no server.

One live shard per collection folder (named in ``<folder>/collection.json``, see ``edge_layout``), named vectors
``image`` and ``report`` (cosine), payload indexes on the fields searches filter on. Every update is written to
the shard's WAL before it returns, so an acknowledged upsert survives the process being killed.

HNSW in the background: search is exact until the shard is optimised. Once ``index.optimize_after_points`` points
were written since the last build, a build starts: the shard is flushed and copied (upserts wait for the copy,
searches do not), a child process optimises the copy (``edge_optimize``: ``optimize()`` holds the GIL, so it
cannot run in a thread of this process without stalling every search), and when it is done the points written
meanwhile are replayed into the copy, collection.json is switched to it atomically and the old shard removed.
Searches keep answering from the live shard throughout (exact, on 2 cores: p95 14 ms at 100k); the swap itself
holds them while the built shard loads (qdrant-edge holds the GIL there too: 0.3 s at 100k float32 points of 512-d,
2.4 s at 1M int8), and upserts wait for the snapshot copy. The copy doubles the index's disk use during a build.

A shard has ONE owner process: qdrant-edge locks the WAL and a second opener fails. In distributed mode the
node (not the Celery workers) owns the index; workers only write outcome files.

Metadata is written before a shard is created: a crash in between leaves metadata without a shard, which the
next open completes, never a shard nobody can identify. Existing format-1 indexes (``image`` only) are migrated
on open (``edge_migrate``).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from config.settings import IndexSettings
from workers.index.base import (IMAGE_VECTOR, VECTOR_NAMES, IndexMismatchError, Match, SearchFilters, StoredPoint,
                                check_identity, check_paging, check_request, checked_query_vectors, checked_using,
                                checked_vector, checked_vectors, payload_conditions, prefetch_depth)
from workers.index.edge_layout import FORMAT_VERSION, CollectionFolder, fsync_folder
from workers.index.edge_migrate import migrate_to_named_vectors
from workers.index.edge_optimize import OptimizeResult, run_optimizer
from workers.index.edge_shard import canonical_id, copy_ids, edge_filter, open_shard, search_params, shard_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """The live shard's counts (``indexed_vectors`` counts HNSW-indexed vectors of every name)."""

    points: int
    indexed_vectors: int
    segments: int
    optimizing: bool


class EdgeIndex:
    """A :class:`~workers.index.base.VectorIndex` on a qdrant-edge shard in ``folder``."""

    def __init__(self, folder: Path | str, settings: IndexSettings | None = None) -> None:
        self.folder = Path(folder)
        self.settings = settings if settings is not None else IndexSettings()
        self.layout = CollectionFolder(self.folder)
        self._shard: Any = None
        self._dim: int | None = None
        self._bundle_id: str | None = None
        self._metadata: dict[str, Any] = {}
        # _lock: the shard handle and every engine call on it (searches take only this one).
        # _write_lock: writers in order: upserts, a build's snapshot copy and its swap. Order: _write_lock, _lock.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending = 0  # points written since the last build
        self._dirty: set[str] | None = None  # ids written since a running build's snapshot (None: no build)
        self._build_thread: threading.Thread | None = None
        self._build_process: subprocess.Popen | None = None
        self._closed = False
        self.last_build: OptimizeResult | None = None

    @property
    def metadata_path(self) -> Path:
        return self.layout.metadata_path

    @property
    def shard_path(self) -> Path:
        """The live shard's folder (known once ensure_collection() has run)."""
        if not self._metadata:
            raise RuntimeError("ensure_collection() must be called before using the index")
        return self.layout.path(CollectionFolder.live_name(self._metadata))

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        check_request(bundle_id, dim)
        dim = int(dim)
        with self._write_lock, self._lock:
            if self._closed:
                raise RuntimeError("the index is closed")
            metadata = self.layout.read()
            if metadata is None:
                if self.layout.any_shard_data():
                    raise IndexMismatchError(f"{self.folder} holds a shard but {self.metadata_path} is missing; "
                                             "refusing to guess which bundle made it")
                metadata = {"format": FORMAT_VERSION, "bundle_id": bundle_id, "dim": dim, "distance": "cosine",
                            "vectors": list(VECTOR_NAMES), "shard": "shard-1", "built_points": 0,
                            "created_at": time.time()}
                self.layout.write(metadata)
                logger.info("event=index_created backend=edge folder=%s bundle_id=%s dim=%d", self.folder,
                            bundle_id, dim)
            found_dim = metadata.get("dim")
            check_identity(metadata.get("bundle_id"), int(found_dim) if isinstance(found_dim, int) else None,
                           bundle_id, dim, f"index {self.folder}")
            if self._shard is None:
                config = shard_config(dim, self.settings)
                if CollectionFolder.format_of(metadata) < FORMAT_VERSION:
                    metadata = migrate_to_named_vectors(self.layout, metadata, config)
                live = CollectionFolder.live_name(metadata)
                self._shard = open_shard(self.layout.path(live), config, create=not self.layout.holds_data(live))
                self.layout.remove_leftovers(live)  # only now: we hold the live shard's lock
                self._metadata = metadata
                built = metadata.get("built_points", 0)
                points = int(self._shard.count(qe.CountRequest(exact=True)))
                self._pending = max(0, points - (int(built) if isinstance(built, int) else 0))
            self._dim, self._bundle_id = dim, bundle_id
        self._maybe_start_build()

    def _require(self) -> Any:
        if self._shard is None:
            raise RuntimeError("ensure_collection() must be called before using the index")
        return self._shard

    def upsert(self, point_id: str, vectors: Mapping[str, Sequence[float]], payload: dict) -> None:
        """Insert or replace one point: a vector not given (``report``) is removed from the point."""
        values = checked_vectors(vectors, self._dim)
        point = qe.Point(str(point_id), values, dict(payload))
        with self._write_lock:
            with self._lock:
                self._require().update(qe.UpdateOperation.upsert_points([point]))
            if self._dirty is not None:
                self._dirty.add(canonical_id(point_id))
            self._pending += 1
        self._maybe_start_build()

    def get(self, point_id: str) -> StoredPoint | None:
        with self._lock:
            records = self._require().retrieve([str(point_id)], with_payload=True, with_vector=True)
        if not records:
            return None
        record = records[0]
        vectors = {str(name): [float(v) for v in vector] for name, vector in dict(record.vector or {}).items()}
        return StoredPoint(canonical_id(record.id), vectors, dict(record.payload or {}))

    def search(self, vector: Sequence[float], limit: int, *, using: str = IMAGE_VECTOR,
               filters: SearchFilters | None = None, offset: int = 0, min_score: float | None = None,
               exact: bool = False) -> list[Match]:
        """Nearest points by one named vector; ``exact`` scans every point on the original vectors (the reference
        for recall; also what an unoptimised shard does anyway)."""
        checked_using(using)
        values = checked_vector(vector, self._dim)
        check_paging(limit, offset)
        if limit < 1:
            return []
        request = qe.QueryRequest(
            limit=int(limit), offset=int(offset) or None, query=qe.Query.Nearest(values, using=using),
            filter=edge_filter(payload_conditions(filters)), params=search_params(self.settings, exact=exact),
            score_threshold=min_score, with_payload=True, with_vector=False,
        )
        with self._lock:
            points = self._require().query(request)
        return [Match(canonical_id(p.id), float(p.score), dict(p.payload or {})) for p in points]

    def search_fused(self, vectors: Mapping[str, Sequence[float]], limit: int, *,
                     filters: SearchFilters | None = None, offset: int = 0) -> list[Match]:
        """qdrant-edge's own fusion: one prefetch per named vector, ``Fusion.Rrf(k=index.rrf_k)`` over them."""
        queries = checked_query_vectors(vectors, self._dim)
        check_paging(limit, offset)
        if limit < 1:
            return []
        condition = edge_filter(payload_conditions(filters))
        params = search_params(self.settings)
        depth = prefetch_depth(limit, offset)
        prefetches = [qe.Prefetch(limit=depth, query=qe.Query.Nearest(query, using=name), params=params,
                                  filter=condition) for name, query in queries.items()]
        request = qe.QueryRequest(limit=int(limit), offset=int(offset) or None,
                                  query=qe.Fusion.Rrf(k=self.settings.rrf_k), prefetches=prefetches,
                                  filter=condition, with_payload=True, with_vector=False)
        with self._lock:
            points = self._require().query(request)
        return [Match(canonical_id(p.id), float(p.score), dict(p.payload or {})) for p in points]

    def count(self) -> int:
        with self._lock:
            return int(self._require().count(qe.CountRequest(exact=True)))

    def info(self) -> ShardInfo:
        with self._lock:
            info = self._require().info()
        return ShardInfo(int(info.points_count), int(info.indexed_vectors_count), int(info.segments_count),
                         self.optimizing)

    # --- HNSW builds -------------------------------------------------------------------------------------------

    @property
    def optimizing(self) -> bool:
        thread = self._build_thread
        return thread is not None and thread.is_alive()

    def _maybe_start_build(self) -> None:
        threshold = self.settings.optimize_after_points
        if threshold > 0 and self._pending >= threshold:
            self.start_optimization()

    def start_optimization(self) -> bool:
        """Start a background HNSW build now, unless one is running; returns whether one was started."""
        with self._write_lock:
            if self._closed or self._shard is None or self.optimizing:
                return False
            self._build_thread = threading.Thread(target=self._build, name="edge-index-build", daemon=True)
            self._build_thread.start()
            return True

    def wait_for_optimization(self, timeout: float | None = None) -> bool:
        """Wait for a running build to finish (swap included); returns False if it is still running."""
        thread = self._build_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def optimize_now(self) -> bool:
        """Build HNSW in this thread, in place. Blocks every search and upsert until done (``optimize()`` holds
        the GIL): for offline tools and benchmarks, never for a serving node."""
        with self._write_lock, self._lock:
            shard = self._require()
            changed = bool(shard.optimize())
            shard.flush()
            points = int(shard.count(qe.CountRequest(exact=True)))
            self._metadata = {**self._metadata, "built_points": points, "built_at": time.time()}
            self.layout.write(self._metadata)
            self._pending = 0
        return changed

    def _build(self) -> None:
        started = time.perf_counter()
        leftover: Path | None = None  # what to remove if the build does not become the live shard
        result_path: Path | None = None
        try:
            with self._write_lock:  # no upsert while the snapshot is taken; searches go on
                if self._closed:
                    return
                new_name = CollectionFolder.next_name(self._metadata)
                leftover = staging = self.layout.staging_path(new_name, "building")
                result_path = self.folder / f".{staging.name}.result.json"
                shutil.rmtree(staging, ignore_errors=True)
                with self._lock:
                    self._require().flush()
                shutil.copytree(self.shard_path, staging)
                self._dirty = set()
                self._pending = 0
            result = run_optimizer(staging, result_path, self._track_process)
            with self._write_lock:
                self._build_process = None
                if self._closed:
                    return
            final = self.layout.path(new_name)
            staging.rename(final)
            leftover = final
            fsync_folder(self.folder)
            built = open_shard(final, shard_config(int(self._dim or 0), self.settings), create=False)
            self._swap(built, new_name, result)
            leftover = None
            logger.info("event=index_optimized backend=edge folder=%s points=%d indexed_vectors=%d build_s=%.1f "
                        "total_s=%.1f", self.folder, result.points, result.indexed_vectors, result.seconds,
                        time.perf_counter() - started)
        except Exception:  # the live shard is untouched; the next threshold tries again
            if self._closed:
                logger.info("event=index_optimize_cancelled backend=edge folder=%s reason=closing", self.folder)
            else:
                logger.exception("event=index_optimize_failed backend=edge folder=%s", self.folder)
        finally:
            with self._write_lock:
                self._dirty = None
                self._build_process = None
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
            if result_path is not None:
                result_path.unlink(missing_ok=True)

    def _track_process(self, process: subprocess.Popen) -> None:
        with self._write_lock:
            self._build_process = process
            closed = self._closed
        if closed:
            process.kill()

    def _swap(self, built: Any, new_name: str, result: OptimizeResult) -> None:
        """Replay the points written during the build into ``built``, then make it the live shard."""
        with self._write_lock:
            if self._closed:
                built.close()
                raise RuntimeError("index closed during the build")
            try:
                dirty = sorted(self._dirty or ())
                with self._lock:  # reads of the live shard: short batches between searches would be nicer,
                    copy_ids(self._require(), built, dirty)  # but the replay is small (points of one build)
                built.flush()
                points = int(built.count(qe.CountRequest(exact=True)))
                metadata = {**self._metadata, "shard": new_name, "built_points": points - len(dirty),
                            "built_at": time.time()}
                self.layout.write(metadata)  # the switch
            except Exception:
                built.close()
                raise
            old_path = self.shard_path
            with self._lock:
                old, self._shard = self._shard, built
                self._metadata = metadata
            old.close()
            self._pending = len(dirty)
            self.last_build = result
        shutil.rmtree(old_path, ignore_errors=True)

    def close(self) -> None:
        with self._write_lock:
            self._closed = True
            process = self._build_process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        thread = self._build_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=120)
        with self._write_lock, self._lock:
            if self._shard is not None:
                self._shard.close()
                self._shard = None
