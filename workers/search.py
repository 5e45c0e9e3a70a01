"""The query engine: similar studies by study, by report/free text, and hybrid with prior reports.

One implementation behind every interface (REST, C-FIND): they call :class:`QueryEngine` and translate its two
errors, :class:`StudyNotFoundError` (404 / zero matches) and :class:`QueryError` (422 / a failure status).

* **By study**: the study's stored vectors (``index.get``); a study the node holds in its spool but has not
  indexed yet is embedded on the fly (``embed_study.compute_outcome``, no outcome file). The study itself and,
  unless asked otherwise, its patient (by pseudonym) are excluded. A study with a ``report`` vector is searched
  by both rankings fused (image->image and report->report); otherwise by its image vector alone.
* **By text**: the bundle's text encoder with the deterministic chunking of evaluation. A text that is a finding
  name alone (:func:`keyword_of`) is embedded in report context (``model_export.keyword_queries``: 0.85 vs 0.58
  mean P@20 against the bare word). The query then searches ``image`` and ``report`` fused by reciprocal rank
  fusion, so "cases whose report says ..." works where the image model is weak; when no candidate has a report
  the search is plain cosine over ``image`` (one cheap probe decides).
* **Scores**: a single-vector search reports cosine similarity; a fused one the RRF score
  (sum of 1/(rrf_k + rank)). ``min_score`` is a cosine threshold in both cases: on a fused search a hit is kept
  when the cosine of at least one of the vectors it was ranked by (query image/text vs its ``image``, query
  report/text vs its ``report``) reaches it, so a study found through its report is not dropped for a weak image
  score. Ranks are counted after the threshold, from ``offset + 1``.

* **Bundle swap**: the engine serves one bundle and its collection at a time (:meth:`QueryEngine.swap`). Each
  query reads that pair once when it starts, so a switch (a reindex completing, a rollback, the first bundle
  arriving) never mixes two vector spaces in one answer; with no bundle yet every query raises
  :class:`NoBundleError` (REST 503, C-FIND failure).

Nothing here logs query text or patient data: the ``query`` echoed in a :class:`SearchResult` holds the study
UID, the text's length (never the text), limits and filters.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from config import Settings
from model_export.keyword_queries import keyword_queries, keyword_texts
from model_export.runtime import ModelBundle
from workers.dicom_uids import InvalidUIDError, check_uid
from workers.handoff import EmbedRequest, EmbedStatus
from workers.index.base import (IMAGE_VECTOR, REPORT_VECTOR, Match, SearchFilters, StoredPoint, VectorIndex,
                                point_id_for)

logger = logging.getLogger(__name__)

__all__ = ["NoBundleError", "QueryEngine", "QueryError", "SearchHit", "SearchResult", "StudyNotFoundError",
           "keyword_of"]

MAX_TEXT_CHARS = 100_000  # far above any report; a guard against pasting a whole file
# A finding name has none of these: sentence punctuation, brackets, digits (sizes, dates), slashes of lists.
_NOT_A_NAME = re.compile(r"[.,;:!?()\[\]{}\"\d]")
# A negated phrase ("no effusion") is a statement about absence, not a finding to look for.
_NEGATIONS = frozenset({"no", "not", "without", "negative", "absent", "absence", "free"})
# Fused searches with a min_score fetch candidates in growing pages until enough pass (bounded).
_MAX_FETCH_ROUNDS = 6


class StudyNotFoundError(LookupError):
    """The study is neither indexed nor held in the spool (or held but without a series that can be embedded)."""


class QueryError(ValueError):
    """The query itself is wrong (empty text, a limit out of range...); the message says what."""


class NoBundleError(QueryError):
    """No model bundle is active yet: the node receives and stores studies, but cannot search them.

    A :class:`QueryError` so that every interface refuses the query with its message (C-FIND: a failure status);
    the REST API answers it with 503 instead of 422, since the query itself is fine.
    """

    def __init__(self, message: str = "no model bundle active yet: the node stores what it receives and embeds "
                                      "it once a bundle is activated (medfinder bundle activate ID)") -> None:
        super().__init__(message)


@dataclass
class _Serving:
    """The bundle and collection queries use, swapped as one object; the keyword cache belongs to the bundle."""

    index: VectorIndex
    bundle: ModelBundle
    bundle_id: str
    neutral_vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchHit:
    """One similar study, with the attributes stored in its index payload."""

    rank: int  # 1-based, after offset (offset 10 -> the first hit has rank 11)
    score: float  # cosine similarity (single vector) or the RRF score (fused)
    study_uid: str
    accession_number: str | None
    study_date: str | None  # YYYYMMDD
    study_description: str | None
    modality: str | None
    body_part: str | None
    institution: str | None
    has_report: bool


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query and what was asked (no PHI: never the text, never a patient pseudonym)."""

    kind: Literal["study", "text"]
    query: dict[str, Any]
    bundle_id: str
    hits: list[SearchHit]


def keyword_of(text: str, known_findings: Sequence[str], max_words: int) -> str | None:
    """The finding name ``text`` consists of, or None when it is a sentence, a report or a phrase with numbers.

    A text is a finding name alone when, after trimming blanks and one trailing period, it is one of the known
    finding names (``eval.keywords``, case-insensitive), or it has at most ``max_words`` words, no sentence
    punctuation, brackets, quotes or digits, and does not start with a negation ("no effusion"). So
    "atelectasis", "Pleural effusion." and "right lower lobe consolidation" are names; "No pneumothorax",
    "nodule 8 mm" and "Consolidation, left base." are not.
    """
    words = " ".join(text.split())
    if words.endswith("."):
        words = words[:-1].rstrip()
    if not words:
        return None
    if words.lower() in {name.strip().lower() for name in known_findings}:
        return words
    tokens = words.split()
    if len(tokens) > max_words or _NOT_A_NAME.search(words) or tokens[0].lower() in _NEGATIONS:
        return None
    return words


def _unit(vector: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64)
    return array / max(float(np.linalg.norm(array)), 1e-12)


def _hit(rank: int, match: Match) -> SearchHit:
    payload = match.payload

    def text(key: str) -> str | None:
        value = payload.get(key)
        return str(value) if value not in (None, "") else None

    return SearchHit(rank=rank, score=float(match.score), study_uid=str(payload.get("study_uid", "")),
                     accession_number=text("accession"), study_date=text("study_date"),
                     study_description=text("study_description"), modality=text("modality"),
                     body_part=text("body_part"), institution=text("institution"),
                     has_report=bool(payload.get("has_report", False)))


@dataclass(frozen=True)
class _StudyQuery:
    """The vectors a study is searched with and whose patient it belongs to."""

    vectors: dict[str, list[float]]
    patient_pseudonym: str | None
    on_the_fly: bool


class QueryEngine:
    """Similar-case search over one index and one loaded bundle at a time; thread-safe (reads only).

    ``request_for(study_uid)`` gives the embed request of a study held in the spool but not (yet) indexed, or
    None; ``report_vector_for(study_uid, bundle_id)`` the stored report vector of a study by that bundle, or
    None (used for a study that is not indexed yet but whose report arrived first). ``index``/``bundle`` None:
    no bundle yet (every query raises :class:`NoBundleError` until :meth:`swap`).
    """

    def __init__(self, settings: Settings, index: VectorIndex | None, bundle: ModelBundle | None,
                 bundle_id: str | None, *, request_for: Callable[[str], EmbedRequest | None],
                 report_vector_for: Callable[[str, str], Sequence[float] | None] | None = None) -> None:
        self.settings = settings
        self._serving: _Serving | None = None
        if index is not None and bundle is not None and bundle_id is not None:
            self.swap(index, bundle, bundle_id)
        elif (index, bundle, bundle_id) != (None, None, None):
            raise ValueError("give the index, the bundle and its id together (or none of them: no bundle yet)")
        self._request_for = request_for
        self._report_vector_for = report_vector_for
        context = settings.eval.keyword_context
        # The neutral report of keyword queries is the same for every keyword: embedded once per bundle.
        self._neutral_text = keyword_texts("finding", context)[1] if context is not None else None

    def swap(self, index: VectorIndex, bundle: ModelBundle, bundle_id: str) -> None:
        """Serve ``bundle`` from ``index`` from the next query on (one assignment: queries running finish on
        the pair they started with)."""
        if bundle.bundle_id != bundle_id:
            raise ValueError(f"the loaded bundle is {bundle.bundle_id!r}, the index holds vectors of {bundle_id!r}")
        self._serving = _Serving(index, bundle, bundle_id)

    def _current(self) -> _Serving:
        serving = self._serving
        if serving is None:
            raise NoBundleError()
        return serving

    @property
    def ready(self) -> bool:
        """Whether a bundle serves (False: every query raises :class:`NoBundleError`)."""
        return self._serving is not None

    @property
    def index(self) -> VectorIndex:
        return self._current().index

    @property
    def bundle(self) -> ModelBundle:
        return self._current().bundle

    @property
    def bundle_id(self) -> str:
        return self._current().bundle_id

    def stored_point(self, study_uid: str) -> StoredPoint | None:
        """The study's point in the serving collection, or None."""
        serving = self._current()
        return serving.index.get(point_id_for(study_uid, serving.bundle_id))

    # --- public API ---------------------------------------------------------------------------------------

    def similar_to_study(self, study_uid: str, *, limit: int, offset: int = 0, filters: SearchFilters | None = None,
                         min_score: float | None = None, include_same_patient: bool = False) -> SearchResult:
        """The studies most similar to ``study_uid`` (never itself; not its patient's unless asked)."""
        started = time.perf_counter()
        serving = self._current()
        study_uid = self._check_uid(study_uid)
        self._check_page(limit, offset, min_score)
        filters = self._check_filters(filters)
        query = self._study_vectors(serving, study_uid)
        exclusions: dict[str, Any] = {"exclude_study_uid": study_uid}
        if not include_same_patient and query.patient_pseudonym:
            exclusions["exclude_patient"] = query.patient_pseudonym
        effective = filters.model_copy(update=exclusions)
        ranking, hits = self._run(serving, query.vectors, effective, limit, offset, min_score)
        echo = {"study_uid": study_uid, **self._page_echo(limit, offset, filters, min_score),
                "include_same_patient": include_same_patient, "vectors": sorted(query.vectors),
                "ranking": ranking, "embedded_on_the_fly": query.on_the_fly}
        logger.info("event=query kind=study study_uid=%s ranking=%s on_the_fly=%s hits=%d ms=%.1f", study_uid,
                    ranking, query.on_the_fly, len(hits), (time.perf_counter() - started) * 1000)
        return SearchResult(kind="study", query=echo, bundle_id=serving.bundle_id, hits=hits)

    def search_text(self, text: str, *, limit: int, offset: int = 0, filters: SearchFilters | None = None,
                    min_score: float | None = None) -> SearchResult:
        """Studies matching a report or free text (a finding name alone: the in-context keyword query)."""
        started = time.perf_counter()
        serving = self._current()
        if not isinstance(text, str) or not text.strip():
            raise QueryError("text must not be empty or whitespace only")
        if len(text) > MAX_TEXT_CHARS:
            raise QueryError(f"text is {len(text)} characters long, at most {MAX_TEXT_CHARS} are accepted")
        self._check_page(limit, offset, min_score)
        filters = self._check_filters(filters)
        vector, mode = self._text_vector(serving, text)
        vectors = {IMAGE_VECTOR: vector}
        if serving.index.search(vector, 1, using=REPORT_VECTOR, filters=filters):  # any candidate with a report?
            vectors[REPORT_VECTOR] = vector
        ranking, hits = self._run(serving, vectors, filters, limit, offset, min_score)
        echo = {"text_length": len(text), "text_mode": mode, **self._page_echo(limit, offset, filters, min_score),
                "vectors": sorted(vectors), "ranking": ranking}
        logger.info("event=query kind=text text_mode=%s ranking=%s hits=%d ms=%.1f", mode, ranking, len(hits),
                    (time.perf_counter() - started) * 1000)
        return SearchResult(kind="text", query=echo, bundle_id=serving.bundle_id, hits=hits)

    def describe(self) -> dict[str, Any]:
        """What health checks and empty states show: the bundle and how many studies are indexed."""
        serving = self._current()
        model = serving.bundle.manifest.model
        return {"bundle_id": serving.bundle_id, "model": model.name, "model_version": model.version,
                "embedding_dim": serving.bundle.embedding_dim, "indexed_studies": serving.index.count(),
                "text_query_modes": ["keyword", "report"], "rrf_k": self.settings.index.rrf_k}

    def text_vector(self, text: str) -> tuple[list[float], Literal["keyword", "report"]]:
        """The query vector of a text and how it was made: ``keyword`` (in-context) or ``report`` (as written)."""
        return self._text_vector(self._current(), text)

    def _text_vector(self, serving: _Serving, text: str) -> tuple[list[float], Literal["keyword", "report"]]:
        keyword = keyword_of(text, self.settings.eval.keywords, self.settings.query.keyword_max_words)
        if keyword is not None:
            vector = keyword_queries(lambda texts: self._embed_for_keywords(serving, texts), [keyword],
                                     self.settings.eval.keyword_context)[0]
            return [float(v) for v in vector], "keyword"
        return [float(v) for v in serving.bundle.embed_text(text)], "report"

    def _embed_for_keywords(self, serving: _Serving, texts: list[str]) -> np.ndarray:
        """``embed_text`` for ``keyword_queries``, with the constant neutral report's embedding kept."""
        if self._neutral_text is None or texts != [self._neutral_text]:
            return serving.bundle.embed_text(texts)
        if serving.neutral_vector is None:
            serving.neutral_vector = serving.bundle.embed_text(texts)
        return serving.neutral_vector

    # --- validation -------------------------------------------------------------------------------------

    @staticmethod
    def _check_uid(study_uid: str) -> str:
        if not str(study_uid or "").strip():
            raise QueryError("study_uid must not be empty")
        try:
            return check_uid(study_uid, "study_uid")
        except InvalidUIDError:
            raise QueryError("study_uid is not a valid DICOM UID (digits and dots, at most 64 characters)") from None

    def _check_page(self, limit: int, offset: int, min_score: float | None) -> None:
        maximum = self.settings.query.max_limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
            raise QueryError(f"limit must be an integer from 1 to {maximum}, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise QueryError(f"offset must be an integer >= 0, got {offset!r}")
        if min_score is not None and (not isinstance(min_score, (int, float)) or isinstance(min_score, bool)
                                      or not math.isfinite(min_score) or not -1.0 <= min_score <= 1.0):
            raise QueryError(f"min_score must be a cosine similarity from -1 to 1, got {min_score!r}")

    @staticmethod
    def _check_filters(filters: SearchFilters | None) -> SearchFilters:
        if filters is None:
            return SearchFilters()
        if not isinstance(filters, SearchFilters):
            raise QueryError(f"filters must be SearchFilters, got {type(filters).__name__}")
        if filters.study_date_from and filters.study_date_to and filters.study_date_from > filters.study_date_to:
            raise QueryError("study_date_from is after study_date_to")
        return filters

    @staticmethod
    def _page_echo(limit: int, offset: int, filters: SearchFilters, min_score: float | None) -> dict[str, Any]:
        shown = filters.model_dump(exclude_none=True, exclude={"exclude_patient"})
        return {"limit": limit, "offset": offset, "filters": shown, "min_score": min_score}

    # --- the study's vectors ------------------------------------------------------------------------------

    def _study_vectors(self, serving: _Serving, study_uid: str) -> _StudyQuery:
        point = serving.index.get(point_id_for(study_uid, serving.bundle_id))
        if point is not None and point.vectors.get(IMAGE_VECTOR):
            vectors = {name: list(point.vectors[name]) for name in (IMAGE_VECTOR, REPORT_VECTOR)
                       if point.vectors.get(name)}
            return _StudyQuery(vectors, point.payload.get("patient_pseudonym"), on_the_fly=False)
        request = self._request_for(study_uid)
        if request is None:
            raise StudyNotFoundError(f"study {study_uid} is neither indexed nor held by this node")
        from workers.embed_study import compute_outcome  # the image pipeline, loaded when first needed

        request = request.model_copy(update={"bundle_id": serving.bundle_id})  # the serving space, always
        started = time.perf_counter()
        outcome = compute_outcome(self.settings, request)
        if outcome.status != EmbedStatus.EMBEDDED or outcome.vector is None or outcome.payload is None:
            raise StudyNotFoundError(f"study {study_uid} is held by this node but cannot be embedded: "
                                     f"{outcome.reason or outcome.status.value}")
        logger.info("event=query_embedded_on_the_fly study_uid=%s seconds=%.2f", study_uid,
                    time.perf_counter() - started)
        vectors = {IMAGE_VECTOR: [float(v) for v in outcome.vector]}
        report = (self._report_vector_for(study_uid, serving.bundle_id) if self._report_vector_for is not None
                  else None)
        if report is not None:
            vectors[REPORT_VECTOR] = [float(v) for v in report]
        return _StudyQuery(vectors, outcome.payload.patient_pseudonym, on_the_fly=True)

    # --- searching ----------------------------------------------------------------------------------------

    def _run(self, serving: _Serving, vectors: Mapping[str, list[float]], filters: SearchFilters, limit: int,
             offset: int, min_score: float | None) -> tuple[str, list[SearchHit]]:
        """Search one vector (cosine) or several (fused); the ranking kind and the hits ranked after offset."""
        if len(vectors) == 1:
            ((using, vector),) = vectors.items()
            matches = serving.index.search(vector, limit, using=using, filters=filters, offset=offset,
                                           min_score=min_score)
            return "cosine", [_hit(offset + i, m) for i, m in enumerate(matches, start=1)]
        if min_score is None:
            matches = serving.index.search_fused(vectors, limit, filters=filters, offset=offset)
        else:
            matches = self._fused_above(serving.index, vectors, filters, limit, offset, min_score)
        return "rrf", [_hit(offset + i, m) for i, m in enumerate(matches, start=1)]

    def _fused_above(self, index: VectorIndex, vectors: Mapping[str, list[float]], filters: SearchFilters,
                     limit: int, offset: int, min_score: float) -> list[Match]:
        """The fused ranking with hits below ``min_score`` on every vector removed, then paged.

        Fetches the top of the fused ranking in growing pages until ``offset + limit`` hits pass or the ranking
        is exhausted (at most :data:`_MAX_FETCH_ROUNDS` rounds, so a very selective threshold returns fewer).
        """
        queries = {name: _unit(vector) for name, vector in vectors.items()}
        wanted = offset + limit
        fetch = max(2 * wanted, 20)
        kept: list[Match] = []
        for _round in range(_MAX_FETCH_ROUNDS):
            candidates = index.search_fused(vectors, fetch, filters=filters)
            kept = [m for m in candidates if self._best_cosine(index, m.point_id, queries) >= min_score]
            if len(kept) >= wanted or len(candidates) < fetch:
                break
            fetch *= 4
        return kept[offset:wanted]

    @staticmethod
    def _best_cosine(index: VectorIndex, point_id: str, queries: Mapping[str, np.ndarray]) -> float:
        point = index.get(point_id)
        if point is None:  # removed meanwhile
            return -math.inf
        scores = [float(np.dot(query, _unit(point.vectors[name]))) for name, query in queries.items()
                  if point.vectors.get(name)]
        return max(scores, default=-math.inf)
