"""The embedded default index: Qdrant's own engine in this process (qdrant-edge), on disk, no server.

One shard per collection folder (``<folder>/shard``), cosine distance, keyword payload indexes on the fields
searches filter on. Every update is written to the shard's WAL before it returns, so an acknowledged upsert
survives the process being killed. Search is exact until the shard is optimised into HNSW; at this node's
scale (≤100k studies) exact search takes ≈1-13 ms, so no background optimisation is started here.

A shard has ONE owner process: qdrant-edge locks the WAL and a second opener fails. In distributed mode the
node (not the Celery workers) owns the index; workers only write outcome files.

The shard has no slot for user metadata, so the bundle id and dimension are recorded in
``<folder>/collection.json`` beside it, written atomically *before* the shard is created: a crash in between
leaves metadata without a shard, which the next open completes, never a shard nobody can identify.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from model_export.atomic_files import write_atomic
from workers.index.base import INDEXED_FIELDS, IndexMismatchError, Match, check_identity, check_request, checked_vector

logger = logging.getLogger(__name__)

VECTOR_NAME = "image"
METADATA_FILE = "collection.json"
SHARD_FOLDER = "shard"
FORMAT_VERSION = 1


class EdgeIndex:
    """A :class:`~workers.index.base.VectorIndex` on a qdrant-edge shard in ``folder``."""

    def __init__(self, folder: Path | str, *, hnsw_ef: int = 128) -> None:
        self.folder = Path(folder)
        self.hnsw_ef = int(hnsw_ef)
        self._shard: Any = None
        self._dim: int | None = None
        self._bundle_id: str | None = None
        self._lock = threading.Lock()

    @property
    def metadata_path(self) -> Path:
        return self.folder / METADATA_FILE

    @property
    def shard_path(self) -> Path:
        return self.folder / SHARD_FOLDER

    def _read_metadata(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.metadata_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise IndexMismatchError(f"{self.metadata_path} is unreadable ({error}); refusing to guess which "
                                     "bundle this index belongs to") from None
        if not isinstance(data, dict):
            raise IndexMismatchError(f"{self.metadata_path} does not hold a JSON object")
        return data

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        check_request(bundle_id, dim)
        dim = int(dim)
        with self._lock:
            metadata = self._read_metadata()
            shard_exists = self.shard_path.is_dir() and any(self.shard_path.iterdir())
            if metadata is None:
                if shard_exists:
                    raise IndexMismatchError(f"{self.shard_path} holds a shard but {self.metadata_path} is missing; "
                                             "refusing to guess which bundle made it")
                self.folder.mkdir(parents=True, exist_ok=True)
                metadata = {"format": FORMAT_VERSION, "bundle_id": bundle_id, "dim": dim, "distance": "cosine",
                            "vector": VECTOR_NAME, "created_at": time.time()}
                write_atomic(self.metadata_path, json.dumps(metadata, indent=2).encode("utf-8"))
                logger.info("event=index_created backend=edge folder=%s bundle_id=%s dim=%d", self.folder,
                            bundle_id, dim)
            found_dim = metadata.get("dim")
            check_identity(metadata.get("bundle_id"), int(found_dim) if isinstance(found_dim, int) else None,
                           bundle_id, dim, f"index {self.folder}")
            if self._shard is None:
                self._shard = self._open_or_create(dim, shard_exists)
            self._dim, self._bundle_id = dim, bundle_id

    def _open_or_create(self, dim: int, exists: bool) -> Any:
        try:
            if exists:
                shard = qe.EdgeShard.load(str(self.shard_path))
            else:
                self.shard_path.mkdir(parents=True, exist_ok=True)
                config = qe.EdgeConfig(vectors={VECTOR_NAME: qe.EdgeVectorParams(size=dim,
                                                                                 distance=qe.Distance.Cosine)})
                shard = qe.EdgeShard.create(str(self.shard_path), config)
        except Exception as error:
            if "WouldBlock" in str(error):
                raise RuntimeError(f"index {self.shard_path} is already open in another process; qdrant-edge "
                                   "allows one owner (run one node per data folder)") from error
            raise
        # Idempotent: creating an existing keyword index is a no-op for the engine.
        for field in INDEXED_FIELDS:
            shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        return shard

    def _require(self) -> Any:
        if self._shard is None:
            raise RuntimeError("ensure_collection() must be called before using the index")
        return self._shard

    def upsert(self, point_id: str, vector: Sequence[float], payload: dict) -> None:
        values = checked_vector(vector, self._dim)
        with self._lock:
            self._require().update(qe.UpdateOperation.upsert_points(
                [qe.Point(str(point_id), {VECTOR_NAME: values}, dict(payload))]))

    def search(self, vector: Sequence[float], limit: int, *, exclude_study_uid: str | None = None,
               exclude_patient: str | None = None) -> list[Match]:
        values = checked_vector(vector, self._dim)
        if limit < 1:
            return []
        must_not = []
        if exclude_study_uid:
            must_not.append(qe.FieldCondition(key="study_uid", match=qe.MatchValue(exclude_study_uid)))
        if exclude_patient:
            must_not.append(qe.FieldCondition(key="patient_pseudonym", match=qe.MatchValue(exclude_patient)))
        request = qe.QueryRequest(
            query=qe.Query.Nearest(values, using=VECTOR_NAME),
            limit=int(limit),
            filter=qe.Filter(must_not=must_not) if must_not else None,
            params=qe.SearchParams(hnsw_ef=self.hnsw_ef),
            with_payload=True,
            with_vector=False,
        )
        with self._lock:
            points = self._require().query(request)
        return [Match(str(p.id), float(p.score), dict(p.payload or {})) for p in points]

    def count(self) -> int:
        with self._lock:
            return int(self._require().count(qe.CountRequest(exact=True)))

    def close(self) -> None:
        with self._lock:
            if self._shard is not None:
                self._shard.close()
                self._shard = None
