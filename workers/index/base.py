"""The one small interface both vector index backends implement, and what they share.

A collection holds the vectors of one model bundle: vectors of two bundles live in different spaces and
must never be compared, so each collection records the bundle id and dimension it was made for and an
index opened for another bundle refuses to use it (:class:`IndexMismatchError`) instead of returning
meaningless neighbours.

Point ids are derived from (StudyInstanceUID, bundle id), so a retried or re-run embedding overwrites its
own point instead of adding a duplicate.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Fixed namespace of MedFinder point ids: changing it would orphan every stored point.
POINT_NAMESPACE = uuid.UUID("6f2a4c1e-8d3b-5e7a-9c0f-1b2d3e4f5a6b")

# Payload keys that searches filter on (keyword payload indexes in both backends).
INDEXED_FIELDS = ("study_uid", "patient_pseudonym", "modality", "body_part", "bundle_id")


class IndexMismatchError(RuntimeError):
    """The collection was made for another bundle or dimension (or a vector has the wrong length)."""


@dataclass(frozen=True)
class Match:
    """One search hit: the point id, its cosine similarity and its stored payload."""

    point_id: str
    score: float
    payload: dict


@runtime_checkable
class VectorIndex(Protocol):
    """A collection of study vectors of one bundle, searchable by cosine similarity."""

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        """Create the collection for ``bundle_id``/``dim``, or check that the existing one was made for them."""

    def upsert(self, point_id: str, vector: Sequence[float], payload: dict) -> None:
        """Insert or overwrite one point (same id = same study and bundle)."""

    def search(self, vector: Sequence[float], limit: int, *, exclude_study_uid: str | None = None,
               exclude_patient: str | None = None) -> list[Match]:
        """The ``limit`` nearest points, best first, skipping one study and/or one patient pseudonym."""

    def count(self) -> int:
        """Number of points in the collection."""

    def close(self) -> None:
        """Release files and locks; the index is unusable afterwards."""


def point_id_for(study_uid: str, bundle_id: str) -> str:
    """The deterministic point id (UUIDv5) of a study embedded by a bundle."""
    if not study_uid or not bundle_id:
        raise ValueError("point_id_for needs a study UID and a bundle id")
    return str(uuid.uuid5(POINT_NAMESPACE, f"{study_uid}\x1f{bundle_id}"))


def checked_vector(vector: Sequence[float], dim: int | None) -> list[float]:
    """``vector`` as a list of finite floats of length ``dim``; a clear error otherwise."""
    if dim is None:
        raise RuntimeError("ensure_collection() must be called before upsert() or search()")
    values = [float(v) for v in vector]
    if len(values) != dim:
        raise IndexMismatchError(f"vector has {len(values)} dimensions, the collection holds {dim}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("vector contains NaN or infinite values")
    if not any(values):
        raise ValueError("vector is all zeros (no cosine similarity is defined)")
    return values


def check_identity(found_bundle: str | None, found_dim: int | None, bundle_id: str, dim: int, where: str) -> None:
    """Refuse a collection recorded for another bundle or dimension, naming both."""
    if found_bundle != bundle_id or found_dim != dim:
        raise IndexMismatchError(
            f"{where} was made for bundle {found_bundle!r} (dim {found_dim}); refusing to use it for bundle "
            f"{bundle_id!r} (dim {dim}). Use another collection/index folder, or re-index with that bundle."
        )


def check_request(bundle_id: str, dim: int) -> None:
    if not bundle_id:
        raise ValueError("bundle_id must not be empty")
    if int(dim) < 1:
        raise ValueError(f"dimension must be positive, got {dim}")
