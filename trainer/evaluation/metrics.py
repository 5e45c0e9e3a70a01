"""Retrieval metrics for the paper's Tables 2 and 3, in plain numpy so that they can be checked by hand.

Conventions (field notes section 1.4):

* ``sim[i, j]`` scores query ``i`` against gallery item ``j``; the ground truth is the diagonal unless ``gt``
  says otherwise; image-to-text uses ``sim.T`` of the very same matrix.
* ``rank_i = 1 + #{j : s_ij > s_i,gt(i)}`` (optimistic: a tie counts in the query's favour). The pessimistic
  ``#{j : s_ij >= s_i,gt(i)}`` is reported beside it, so that ties can never inflate a result unnoticed.
* Recall R@K is a percentage (like the paper's Table 2); precision P@K is a fraction in [0, 1] (the paper's
  Table 3 reports keyword P@20 of about 0.75).
* Every top-K list is the prefix of a *stable* descending sort: equal scores are taken in gallery order
  (lower index first), so a result never depends on the sorting algorithm or on the machine.
* Numbers are always over the full gallery of N items; chance values are reported with them.

Labels are the ground truth for keyword and image-to-image precision, never the report text. A label set
is compared after ``strip().lower()``; "atelectasis" does **not** match "laminar atelectasis" unless the
caller says so through ``keyword_labels`` (a finding name is a class, not a substring).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

RECALL_KS: tuple[int, ...] = (1, 5, 10)
PRECISION_KS: tuple[int, ...] = (20, 50, 100)
IMAGE_KS: tuple[int, ...] = (1, 5, 10)
MEAN_KEY = "mean"

# Rows compared at once when ranking or ranking-by-partition; bounds temporaries to ~rows x Ng bytes.
_ROW_BLOCK = 1024

LabelsLike = Sequence[Iterable[str]] | np.ndarray


# --------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------


def _as_matrix(name: str, value: Any) -> np.ndarray:
    """A finite-checked float64 2-D array: float64 keeps distinct float32 scores distinct (fewer fake ties)."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN: a NaN score has no rank")
    return array


def _as_vector(name: str, value: Any) -> np.ndarray:
    """A NaN-checked float64 1-D array (a comparison with NaN is always False and would fake a top rank)."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN: a NaN score has no rank")
    return array


def _check_ks(ks: Iterable[int], name: str = "ks") -> tuple[int, ...]:
    """Positive integers, duplicates dropped, order kept (the order is the table's column order)."""
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or int(k) != k or int(k) < 1:
            raise ValueError(f"{name} must hold positive integers, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


def _check_pair(text_emb: Any, image_emb: Any, text_name: str, image_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two embedding matrices of the same width; paired ones must also have the same number of rows."""
    text = _as_matrix(text_name, text_emb)
    image = _as_matrix(image_name, image_emb)
    if text.shape[1] != image.shape[1]:
        raise ValueError(
            f"{text_name} and {image_name} have different embedding widths: {text.shape[1]} vs {image.shape[1]}"
        )
    return text, image


def _normalise_label(label: str) -> str:
    """Case and surrounding blanks carry no meaning in a finding name; everything else does."""
    return str(label).strip().lower()


def _label_sets(labels: Sequence[Iterable[str]]) -> list[frozenset[str]]:
    """Per-item label sets; a bare string is refused (it would silently become a set of characters)."""
    sets: list[frozenset[str]] = []
    for i, item in enumerate(labels):
        if isinstance(item, str):
            raise ValueError(f"labels[{i}] is a string; give a set/list of label names per item")
        sets.append(frozenset(n for n in (_normalise_label(x) for x in item) if n))
    return sets


def _is_bool_matrix(labels: Any) -> bool:
    """A numpy array of labels is a [N, L] indicator matrix; anything else is a list of label sets."""
    return isinstance(labels, np.ndarray)


def _bool_matrix(labels: np.ndarray, n_items: int) -> np.ndarray:
    """Checked [N, L] indicator matrix (ints 0/1 allowed)."""
    if labels.ndim != 2 or labels.shape[0] != n_items:
        raise ValueError(f"label matrix must have shape [{n_items}, L], got {labels.shape}")
    if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
        raise ValueError("label matrix must be boolean (or 0/1)")
    return labels.astype(bool)


# --------------------------------------------------------------------------------------------------------
# ranking primitives
# --------------------------------------------------------------------------------------------------------


def _stable_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top ``k`` per row, descending, ties by lower index: ``argsort(-s, stable)[:, :k]``.

    Why not just that argsort: a full stable sort of a 5000 x 5000 matrix costs seconds; a partition finds
    the k-th best score in a fraction of that, and only rows with a tie *at* that threshold (where the
    partition cannot tell which of the tied items belong to the top k) need the full stable sort.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    negated = -scores  # ascending order of -s == descending order of s; -0.0 == 0.0 keeps ties tied
    if k == n_cols or n_cols <= 64:
        return np.argsort(negated, axis=1, kind="stable")[:, :k]
    out = np.empty((n_rows, k), dtype=np.int64)
    for start in range(0, n_rows, _ROW_BLOCK):
        block = negated[start : start + _ROW_BLOCK]
        threshold = np.partition(block, k - 1, axis=1)[:, k - 1 : k]
        candidates = block <= threshold  # the top k plus every item tied with the k-th
        exact = candidates.sum(axis=1) == k
        rows = np.flatnonzero(exact)
        if rows.size:
            # np.nonzero walks row-major, so each row's columns come out in ascending index order and the
            # stable sort below keeps that order among equal scores.
            cols = np.nonzero(candidates[rows])[1].reshape(rows.size, k)
            order = np.argsort(np.take_along_axis(block[rows], cols, axis=1), axis=1, kind="stable")
            out[start + rows] = np.take_along_axis(cols, order, axis=1)
        tied = np.flatnonzero(~exact)
        if tied.size:
            out[start + tied] = np.argsort(block[tied], axis=1, kind="stable")[:, :k]
    return out


def _check_gt(gt: Any, n_queries: int, n_gallery: int) -> np.ndarray:
    """Ground-truth gallery index per query; the default diagonal needs at least as many gallery items."""
    if gt is None:
        if n_queries > n_gallery:
            raise ValueError(f"the default diagonal needs Nq <= Ng, got {n_queries} x {n_gallery}; pass gt")
        return np.arange(n_queries)
    index = np.asarray(gt)
    if index.shape != (n_queries,) or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"gt must be {n_queries} integer gallery indices, got shape {index.shape} {index.dtype}")
    if (index < 0).any() or (index >= n_gallery).any():
        raise ValueError(f"gt indices must lie in [0, {n_gallery}), got {index.min()}..{index.max()}")
    return index.astype(np.int64)


def ranks_of_ground_truth(sim: np.ndarray, gt: np.ndarray | None = None, pessimistic: bool = False) -> np.ndarray:
    """1-based rank of each query's ground-truth item in its row of ``sim`` [Nq, Ng].

    Optimistic ``1 + #{j : s_ij > s_i,gt}``; pessimistic ``#{j : s_ij >= s_i,gt}`` (the item itself counts
    once, so with no ties both agree). Counting instead of sorting makes ties explicit and is O(Nq*Ng).
    """
    scores = _as_matrix("sim", sim)
    n_queries, n_gallery = scores.shape
    index = _check_gt(gt, n_queries, n_gallery)
    ranks = np.empty(n_queries, dtype=np.int64)
    for start in range(0, n_queries, _ROW_BLOCK):
        block = scores[start : start + _ROW_BLOCK]
        target = block[np.arange(block.shape[0]), index[start : start + _ROW_BLOCK]][:, None]
        if pessimistic:
            ranks[start : start + block.shape[0]] = (block >= target).sum(axis=1)
        else:
            ranks[start : start + block.shape[0]] = 1 + (block > target).sum(axis=1)
    return ranks


def _rank_summary(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """R@K in percent, median and mean rank (np.median gives x.5 for an even number of queries)."""
    out: dict[str, float] = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    return out


def chance_recall(n_gallery: int, ks: Iterable[int] = RECALL_KS) -> dict[str, float]:
    """What a random ranking of ``n_gallery`` items scores: R@K = 100*min(K, N)/N, MdR = MnR = (N+1)/2."""
    if n_gallery < 1:
        raise ValueError(f"n_gallery must be >= 1, got {n_gallery}")
    out: dict[str, float] = {f"R@{k}": 100.0 * min(k, n_gallery) / n_gallery for k in _check_ks(ks)}
    out["MdR"] = (n_gallery + 1) / 2.0
    out["MnR"] = (n_gallery + 1) / 2.0
    return out


def recall_metrics(sim: np.ndarray, gt: np.ndarray | None = None, ks: Iterable[int] = RECALL_KS) -> dict[str, Any]:
    """Table 2 numbers for one direction of ``sim`` [Nq, Ng]; the structure is::

        {"N": Ng, "n_queries": Nq,
         "R@1": %, "R@5": %, "R@10": %, "MdR": float, "MnR": float,          # optimistic ranks
         "pessimistic": {"R@1": %, ..., "MdR": float, "MnR": float},         # ties counted against
         "n_tied_queries": int,   # queries whose two ranks differ (0 means the ties question is moot)
         "chance": {"R@1": %, ..., "MdR": (N+1)/2, "MnR": (N+1)/2}}
    """
    checked_ks = _check_ks(ks)
    scores = _as_matrix("sim", sim)
    optimistic = ranks_of_ground_truth(scores, gt)
    pessimistic = ranks_of_ground_truth(scores, gt, pessimistic=True)
    out: dict[str, Any] = {"N": int(scores.shape[1]), "n_queries": int(scores.shape[0])}
    out.update(_rank_summary(optimistic, checked_ks))
    out["pessimistic"] = _rank_summary(pessimistic, checked_ks)
    out["n_tied_queries"] = int(np.count_nonzero(pessimistic != optimistic))
    out["chance"] = chance_recall(scores.shape[1], checked_ks)
    return out


def text_image_metrics(
    text_emb: np.ndarray, image_emb: np.ndarray, ks: Iterable[int] = RECALL_KS
) -> dict[str, dict[str, Any]]:
    """Both directions of paired retrieval: ``{"t2i": recall_metrics(sim), "i2t": recall_metrics(sim.T)}``.

    Row i of ``text_emb`` [N, E] is the report of volume i in ``image_emb`` [N, E]; both are expected to be
    L2-normalised already (the model's heads do it), so ``sim`` is cosine similarity. One matrix serves both
    directions, so a tie in one is the same tie in the other.
    """
    text, image = _check_pair(text_emb, image_emb, "text_emb", "image_emb")
    if text.shape[0] != image.shape[0]:
        raise ValueError(
            f"text_emb and image_emb must be paired row by row: {text.shape[0]} vs {image.shape[0]} rows"
        )
    sim = text @ image.T
    return {"t2i": recall_metrics(sim, ks=ks), "i2t": recall_metrics(sim.T, ks=ks)}


# --------------------------------------------------------------------------------------------------------
# precision against labels
# --------------------------------------------------------------------------------------------------------


def _precision_from_order(
    relevant_in_order: np.ndarray, ks: tuple[int, ...], n_gallery: int
) -> tuple[dict[str, float], dict[str, int]]:
    """Mean P@K over rows of ``relevant_in_order`` [Q, Kmax] (row q: relevance of q's ranked list)."""
    hits = np.cumsum(relevant_in_order, axis=1)
    values: dict[str, float] = {}
    effective: dict[str, int] = {}
    for k in ks:
        k_eff = min(k, n_gallery)
        values[f"P@{k}"] = float(np.mean(hits[:, k_eff - 1] / k_eff))
        effective[f"P@{k}"] = int(k_eff)
    return values, effective


def precision_at_k(
    scores: np.ndarray, relevant: np.ndarray, ks: Iterable[int] = PRECISION_KS
) -> dict[str, Any]:
    """P@K = |top-K ∩ relevant| / K as a fraction, for one query's ``scores`` over the gallery [Ng].

    Top-K is a stable descending sort (ties: lower gallery index first). A K above Ng is clipped to Ng
    (otherwise the empty slots would count as misses); the key stays ``"P@K"``::

        {"P@20": float, ..., "K_effective": {"P@20": int, ...}, "N": Ng, "positives": int}
    """
    checked_ks = _check_ks(ks)
    values = _as_vector("scores", scores)
    mask = np.asarray(relevant)
    if mask.shape != values.shape:
        raise ValueError(f"relevant must have the shape of scores {values.shape}, got {mask.shape}")
    mask = mask.astype(bool)
    top = _stable_top_k(values[None, :], max(checked_ks))[0]
    precision, effective = _precision_from_order(mask[top][None, :], checked_ks, values.shape[0])
    return {**precision, "K_effective": effective, "N": int(values.shape[0]), "positives": int(mask.sum())}


def _keyword_relevance(
    labels: LabelsLike,
    keywords: Sequence[str],
    n_items: int,
    keyword_labels: Mapping[str, Collection[str]] | None,
) -> np.ndarray:
    """[N, Q] ground truth: item n is relevant to keyword q when its labels hold one of q's label names."""
    if _is_bool_matrix(labels):
        matrix = _bool_matrix(labels, n_items)  # type: ignore[arg-type]
        if matrix.shape[1] != len(keywords):
            raise ValueError(
                f"a label matrix for keywords needs one column per keyword ({len(keywords)}), got {matrix.shape[1]}"
            )
        return matrix
    sets = _label_sets(labels)  # type: ignore[arg-type]
    if len(sets) != n_items:
        raise ValueError(f"labels must have one entry per gallery item ({n_items}), got {len(sets)}")
    relevant = np.zeros((n_items, len(keywords)), dtype=bool)
    for q, keyword in enumerate(keywords):
        names = keyword_labels.get(keyword, (keyword,)) if keyword_labels is not None else (keyword,)
        wanted = {_normalise_label(name) for name in names}
        relevant[:, q] = [bool(wanted & item) for item in sets]
    return relevant


def keyword_precision(
    query_emb: np.ndarray,
    image_emb: np.ndarray,
    labels: LabelsLike,
    keywords: Sequence[str],
    ks: Iterable[int] = PRECISION_KS,
    keyword_labels: Mapping[str, Collection[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Keyword-as-query retrieval (the paper's Table 3): embedded keyword q ranks every volume.

    ``query_emb`` [Q, E] holds the embedded keywords, row q for ``keywords[q]``; ``image_emb`` is [N, E].
    ``labels`` is a list of N label sets, or an [N, Q] boolean matrix whose column q belongs to keyword q.
    With label sets, keyword q matches the labels ``keyword_labels.get(q, {q})`` (case-insensitive, exact
    names: say ``{"atelectasis": {"atelectasis", "laminar atelectasis"}}`` to merge sub-types). Result::

        {keyword: {"P@20": fraction, ..., "K_effective": {"P@20": int, ...},
                   "prevalence": positives / N,          # = the expected P@K of a random ranking
                   "positives": int,
                   "ideal": {"P@20": min(positives, K) / K, ...}},   # the best any ranking can do
         ...,
         "mean": {"P@20": ..., ..., "K_effective": {...}, "prevalence": ..., "ideal": {...},
                  "n_keywords": int}}   # averaged over the keywords with >= 1 positive only

    Keywords with no positive in the gallery are reported but left out of the mean: their P@K is 0 by
    construction and would only measure the test set, not the model.
    """
    checked_ks = _check_ks(ks)
    queries, gallery = _check_pair(query_emb, image_emb, "query_emb", "image_emb")
    keywords = [str(k) for k in keywords]
    if len(keywords) != queries.shape[0]:
        raise ValueError(f"query_emb has {queries.shape[0]} rows but {len(keywords)} keywords were given")
    if len(set(keywords)) != len(keywords):
        raise ValueError(f"keywords must be distinct, got {keywords}")
    if MEAN_KEY in keywords:
        raise ValueError(f"{MEAN_KEY!r} is reserved for the average and cannot be a keyword")
    n_items = gallery.shape[0]
    relevant = _keyword_relevance(labels, keywords, n_items, keyword_labels)
    scores = queries @ gallery.T  # [Q, N]
    top = _stable_top_k(scores, max(checked_ks))
    relevant_in_order = np.take_along_axis(relevant.T, top, axis=1)

    out: dict[str, dict[str, Any]] = {}
    for q, keyword in enumerate(keywords):
        precision, effective = _precision_from_order(relevant_in_order[q : q + 1], checked_ks, n_items)
        positives = int(relevant[:, q].sum())
        ideal = {key: min(positives, k_eff) / k_eff for key, k_eff in effective.items()}
        out[keyword] = {
            **precision,
            "K_effective": effective,
            "prevalence": positives / n_items,
            "positives": positives,
            "ideal": ideal,
        }
    counted = [out[k] for k in keywords if out[k]["positives"] > 0]
    mean: dict[str, Any] = {
        f"P@{k}": float(np.mean([entry[f"P@{k}"] for entry in counted])) if counted else 0.0 for k in checked_ks
    }
    mean["K_effective"] = dict(out[keywords[0]]["K_effective"])
    mean["prevalence"] = float(np.mean([entry["prevalence"] for entry in counted])) if counted else 0.0
    mean["ideal"] = {
        key: float(np.mean([entry["ideal"][key] for entry in counted])) if counted else 0.0
        for key in mean["K_effective"]
    }
    mean["n_keywords"] = len(counted)
    out[MEAN_KEY] = mean
    return out


def _shared_label_relevance(labels: LabelsLike, n_items: int) -> np.ndarray:
    """[N, N] relevance: share >= 1 label; an unlabelled (normal) query finds the other unlabelled items."""
    if _is_bool_matrix(labels):
        matrix = _bool_matrix(labels, n_items)  # type: ignore[arg-type]
    else:
        sets = _label_sets(labels)  # type: ignore[arg-type]
        if len(sets) != n_items:
            raise ValueError(f"labels must have one entry per volume ({n_items}), got {len(sets)}")
        vocabulary = sorted(set().union(*sets)) if sets else []
        column = {name: c for c, name in enumerate(vocabulary)}
        matrix = np.zeros((n_items, len(vocabulary)), dtype=bool)
        for i, item in enumerate(sets):
            matrix[i, [column[name] for name in item]] = True
    as_float = matrix.astype(np.float32)
    shares = (as_float @ as_float.T) > 0  # counts are small integers: exact in float32
    normal = ~matrix.any(axis=1)
    return np.where(normal[:, None], normal[None, :], shares)


def image_to_image_precision(
    image_emb: np.ndarray, labels: LabelsLike, ks: Iterable[int] = IMAGE_KS
) -> dict[str, Any]:
    """Volume-as-query retrieval over all *other* volumes, scored by label agreement.

    The query is removed from its own gallery: it would always be its own nearest neighbour and make P@1
    meaningless (CT-CLIP's MAP@K keeps it). A retrieved volume is relevant when it shares at least one
    label with the query; for a query with no labels (a normal study), the relevant ones are the other
    unlabelled volumes. ``labels`` is a list of N label sets or an [N, L] boolean matrix. Result::

        {"N": N, "gallery_size": N - 1,
         "P@1": fraction, "P@5": ..., "P@10": ...,           # mean over all N queries
         "K_effective": {"P@1": int, ...},                 # K clipped to N - 1
         "chance": {"P@1": c, ...},   # mean over queries of (#relevant others) / (N - 1), same for every K
         "n_queries_without_relevant": int}   # queries that score 0 whatever the model does
    """
    checked_ks = _check_ks(ks)
    images = _as_matrix("image_emb", image_emb)
    n_items = images.shape[0]
    if n_items < 2:
        raise ValueError("image-to-image retrieval needs at least 2 volumes (the query is excluded)")
    relevant = _shared_label_relevance(labels, n_items)
    np.fill_diagonal(relevant, False)
    sim = images @ images.T
    np.fill_diagonal(sim, -np.inf)  # self sorts last, so it is never in a top-K with K <= N - 1
    top = _stable_top_k(sim, min(max(checked_ks), n_items - 1))
    precision, effective = _precision_from_order(np.take_along_axis(relevant, top, axis=1), checked_ks, n_items - 1)
    per_query_chance = relevant.sum(axis=1) / (n_items - 1)
    chance = float(np.mean(per_query_chance))
    return {
        "N": int(n_items),
        "gallery_size": int(n_items - 1),
        **precision,
        "K_effective": effective,
        "chance": {f"P@{k}": chance for k in checked_ks},
        "n_queries_without_relevant": int(np.count_nonzero(per_query_chance == 0)),
    }


# --------------------------------------------------------------------------------------------------------
# everything for one method
# --------------------------------------------------------------------------------------------------------


def evaluate_embeddings(
    text_emb: np.ndarray,
    image_emb: np.ndarray,
    labels: LabelsLike | None = None,
    keyword_emb: Mapping[str, np.ndarray] | None = None,
    ks: Iterable[int] = RECALL_KS,
    precision_ks: Iterable[int] = PRECISION_KS,
    image_ks: Iterable[int] = IMAGE_KS,
    keyword_labels: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """All of one method's numbers on one test set; ``medfinder evaluate`` calls it once per method.

    ``text_emb`` [N, E] and ``image_emb`` [N, E] are paired row by row and L2-normalised; ``labels`` has one
    label set per volume (or an indicator matrix, see :func:`keyword_precision` for its column rule);
    ``keyword_emb`` maps each keyword to its embedded query ([E] or [1, E]). Result (the input of every
    table in :mod:`trainer.evaluation.report`)::

        {"N": N,
         "t2i": recall_metrics(text @ image.T),   # R@K %, MdR, MnR, "pessimistic", "chance", ...
         "i2t": recall_metrics((text @ image.T).T),
         "keyword": keyword_precision(...),        # only when keyword_emb is given (needs labels)
         "i2i": image_to_image_precision(...)}     # only when labels are given
    """
    result: dict[str, Any] = {}
    directions = text_image_metrics(text_emb, image_emb, ks)
    result["N"] = directions["t2i"]["N"]
    result.update(directions)
    if keyword_emb is not None:
        if labels is None:
            raise ValueError("keyword precision needs labels (the ground truth is never the report text)")
        if not keyword_emb:
            raise ValueError("keyword_emb is empty")
        keywords = list(keyword_emb)
        rows = [np.asarray(keyword_emb[k], dtype=np.float64).reshape(-1) for k in keywords]
        if len({row.shape[0] for row in rows}) != 1:
            raise ValueError("all keyword embeddings must have the same width")
        result["keyword"] = keyword_precision(
            np.stack(rows), image_emb, labels, keywords, precision_ks, keyword_labels=keyword_labels
        )
    if labels is not None:
        result["i2i"] = image_to_image_precision(image_emb, labels, image_ks)
    return result
