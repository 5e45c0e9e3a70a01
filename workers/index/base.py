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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

# Fixed namespace of MedFinder point ids: changing it would orphan every stored point.
POINT_NAMESPACE = uuid.UUID("6f2a4c1e-8d3b-5e7a-9c0f-1b2d3e4f5a6b")

# Named vectors of a study's point: its images (always) and its report's text (when a report is known).
IMAGE_VECTOR = "image"
REPORT_VECTOR = "report"
VECTOR_NAMES = (IMAGE_VECTOR, REPORT_VECTOR)

# Payload keys that searches filter on (keyword payload indexes in both backends), and the integer one.
INDEXED_FIELDS = ("study_uid", "patient_pseudonym", "modality", "body_part", "bundle_id", "sex", "age_band",
                  "institution")
STUDY_DAY_FIELD = "study_day"  # StudyDate as an integer YYYYMMDD, for date ranges


class SearchFilters(BaseModel):
    """What a search may be restricted to, on the payload; every field optional (None = no restriction).

    Dates are DICOM DA strings (YYYYMMDD), inclusive. ``exclude_*`` drop the query's own study and patient.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: str | None = None
    body_part: str | None = None
    study_date_from: str | None = Field(None, pattern=r"^\d{8}$")
    study_date_to: str | None = Field(None, pattern=r"^\d{8}$")
    sex: Literal["M", "F", "O"] | None = None
    age_band: str | None = None  # as in the payload: "40-49", "90+"
    institution: str | None = None
    exclude_study_uid: str | None = None
    exclude_patient: str | None = None  # a patient pseudonym


class IndexMismatchError(RuntimeError):
    """The collection was made for another bundle or dimension (or a vector has the wrong length)."""


@dataclass(frozen=True)
class Match:
    """One search hit: the point id, its score (cosine; for a fused search the RRF score) and its payload."""

    point_id: str
    score: float
    payload: dict


@dataclass(frozen=True)
class StoredPoint:
    """One point read back: its named vectors (only those it has) and its payload."""

    point_id: str
    vectors: dict[str, list[float]]
    payload: dict


@runtime_checkable
class VectorIndex(Protocol):
    """A collection of study vectors of one bundle, searchable by cosine similarity."""

    def ensure_collection(self, bundle_id: str, dim: int) -> None:
        """Create the collection for ``bundle_id``/``dim``, or check that the existing one was made for them."""

    def upsert(self, point_id: str, vectors: Mapping[str, Sequence[float]], payload: dict) -> None:
        """Insert or overwrite one point (same id = same study and bundle) with all its named vectors.

        ``vectors`` must hold ``image``; ``report`` only when the study's report is known.
        """

    def get(self, point_id: str) -> StoredPoint | None:
        """The point with its vectors and payload, or None."""

    def search(self, vector: Sequence[float], limit: int, *, using: str = IMAGE_VECTOR,
               filters: SearchFilters | None = None, offset: int = 0,
               min_score: float | None = None) -> list[Match]:
        """The nearest points by one named vector (cosine), best first, after ``offset``; ``min_score`` cuts."""

    def search_fused(self, vectors: Mapping[str, Sequence[float]], limit: int, *,
                     filters: SearchFilters | None = None, offset: int = 0) -> list[Match]:
        """Reciprocal rank fusion of one ranking per named vector given: score = sum of 1/(rrf_k + position), the
        position counted from 0 as Qdrant does. A point lacking one of the vectors is ranked by the others."""

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


def checked_using(using: str) -> str:
    """``using`` if it names one of the collection's vectors; a clear error otherwise."""
    if using not in VECTOR_NAMES:
        raise ValueError(f"unknown vector {using!r}; the collection holds {', '.join(VECTOR_NAMES)}")
    return using


def checked_vectors(vectors: Mapping[str, Sequence[float]], dim: int | None) -> dict[str, list[float]]:
    """The named vectors of one point, each checked; ``image`` is required, unknown names are refused."""
    unknown = sorted(set(vectors) - set(VECTOR_NAMES))
    if unknown:
        raise ValueError(f"unknown vector name(s) {unknown}; the collection holds {', '.join(VECTOR_NAMES)}")
    if IMAGE_VECTOR not in vectors:
        raise ValueError(f"a point needs its {IMAGE_VECTOR!r} vector")
    return {name: checked_vector(vector, dim) for name, vector in vectors.items()}


def checked_query_vectors(vectors: Mapping[str, Sequence[float]], dim: int | None) -> dict[str, list[float]]:
    """The query vectors of a fused search: at least one, each naming a collection vector."""
    if not vectors:
        raise ValueError("a fused search needs at least one named query vector")
    return {checked_using(name): checked_vector(vector, dim) for name, vector in vectors.items()}


def check_paging(limit: int, offset: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must not be negative, got {offset}")
    if limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")


@dataclass(frozen=True)
class PayloadConditions:
    """A :class:`SearchFilters` as engine-neutral conditions; each backend maps them onto its own filter types."""

    equal: tuple[tuple[str, str], ...]  # keyword matches that must hold
    not_equal: tuple[tuple[str, str], ...]  # keyword matches that must not hold (own study, own patient)
    day_from: int | None  # inclusive bounds on STUDY_DAY_FIELD
    day_to: int | None

    @property
    def has_range(self) -> bool:
        return self.day_from is not None or self.day_to is not None


def payload_conditions(filters: SearchFilters | None) -> PayloadConditions | None:
    """What ``filters`` asks of the payload, or None when it asks nothing."""
    if filters is None:
        return None
    equal = tuple((key, value) for key, value in (
        ("modality", filters.modality), ("body_part", filters.body_part), ("sex", filters.sex),
        ("age_band", filters.age_band), ("institution", filters.institution)) if value is not None)
    not_equal = tuple((key, value) for key, value in (
        ("study_uid", filters.exclude_study_uid), ("patient_pseudonym", filters.exclude_patient)) if value)
    day_from = int(filters.study_date_from) if filters.study_date_from else None
    day_to = int(filters.study_date_to) if filters.study_date_to else None
    conditions = PayloadConditions(equal, not_equal, day_from, day_to)
    return conditions if (equal or not_equal or conditions.has_range) else None


def prefetch_depth(limit: int, offset: int) -> int:
    """How deep each ranking of a fused search is taken: twice the page, so a point ranked just below the page
    on one list still collects its other list's share (at least 20)."""
    return max(20, 2 * (limit + offset))


def fuse_rrf(rankings: Sequence[Sequence[Match]], k: int) -> list[Match]:
    """Reciprocal rank fusion as Qdrant computes it: score = sum over rankings of 1 / (k + position), the position
    counted from 0 (the best hit of a ranking adds 1/k). Ties keep the order of first appearance.

    Used only where the engine cannot fuse (a Qdrant server without parametrised RRF); the engines' own fusion
    gives the same scores (tests/test_index_backends.py checks the arithmetic against both).
    """
    scores: dict[str, float] = {}
    first: dict[str, Match] = {}
    for ranking in rankings:
        for position, match in enumerate(ranking):
            scores[match.point_id] = scores.get(match.point_id, 0.0) + 1.0 / (k + position)
            first.setdefault(match.point_id, match)
    order = sorted(scores, key=lambda point_id: -scores[point_id])  # stable: ties keep first appearance
    return [Match(point_id, scores[point_id], first[point_id].payload) for point_id in order]
