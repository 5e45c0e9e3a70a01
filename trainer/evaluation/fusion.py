"""Reciprocal rank fusion in numpy, computed exactly as Qdrant's ``Fusion.Rrf`` computes it.

Why here and not through the index: the layers contract forbids ``trainer -> workers``, so the evaluation
cannot open ``workers.index``. Exact cosine ranking in numpy is what the index's exact search returns, and the
fusion below is pinned to the engine by ``tests/test_hybrid_eval.py``, which runs qdrant-edge's fused query
(and the index's ``search_fused``) on the same vectors and asserts the same order.

Qdrant's formula, measured on qdrant-edge 0.9.0: ``score = sum over rankings of 1 / (k + position)`` with
``position`` **0-based** (k = 2, positions 0 and 1 give 1/2 + 1/3 = 0.8333). Written with a 1-based rank r
that is ``1 / (k + r - 1)``. A ranking truncated at ``prefetch`` items contributes nothing for the items
beyond it (what a prefetch ``limit`` does); ``prefetch=None`` fuses the full rankings, so every gallery item
gets a rank and MdR/MnR are defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranking_positions(scores: np.ndarray) -> np.ndarray:
    """``[Nq, Ng]`` scores -> the 0-based position of each gallery item in each query's ranking.

    The ranking is a stable descending sort: equal scores keep gallery order (lower index first), the same
    convention as the metrics' top-K lists.
    """
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"scores must be a non-empty 2-D array, got shape {matrix.shape}")
    if np.isnan(matrix).any():
        raise ValueError("scores contain NaN: a NaN score has no position")
    order = np.argsort(-matrix, axis=1, kind="stable")
    positions = np.empty_like(order)
    positions[np.arange(matrix.shape[0])[:, None], order] = np.arange(matrix.shape[1])[None, :]
    return positions


def rrf_scores(rankings: Sequence[np.ndarray], k: int, prefetch: int | None = None) -> np.ndarray:
    """Fuse several ``[Nq, Ng]`` score matrices (one per named vector) into ``[Nq, Ng]`` RRF scores.

    ``k``: the RRF constant (``settings.index.rrf_k``); ``prefetch``: how deep each ranking is read (None =
    all of it). Items in no truncated ranking score 0 and so share the last place.
    """
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if prefetch is not None and int(prefetch) < 1:
        raise ValueError(f"prefetch must be a positive integer or None, got {prefetch!r}")
    if not rankings:
        raise ValueError("nothing to fuse: give at least one score matrix")
    shapes = {np.shape(matrix) for matrix in rankings}
    if len(shapes) != 1:
        raise ValueError(f"all score matrices must have one shape, got {sorted(shapes)}")
    fused = np.zeros(next(iter(shapes)), dtype=np.float64)
    for matrix in rankings:
        positions = ranking_positions(matrix)
        contribution = 1.0 / (int(k) + positions)
        if prefetch is not None:
            contribution[positions >= int(prefetch)] = 0.0
        fused += contribution
    return fused
