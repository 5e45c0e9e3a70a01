"""Keyword queries in report context (model_export.keyword_queries) and their configuration."""

from __future__ import annotations

import numpy as np
import pytest

from config.loader import ConfigError, load_settings
from model_export.keyword_queries import DEFAULT_KEYWORD_CONTEXT, keyword_queries, keyword_sentence, keyword_texts


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A transparent text 'encoder' for the arithmetic: counts of a few words (not a model)."""
    vocabulary = ("nodule.", "atelectasis.", "effusion.", "heart", "findings:")
    return np.array([[t.lower().split().count(w) for w in vocabulary] for t in texts], dtype=np.float64) + 0.5


def test_keyword_is_stated_as_a_sentence_in_the_slot() -> None:
    stated, neutral = keyword_texts("  pleural   effusion ", "FINDINGS: No pneumothorax. {finding} IMPRESSION: x.")
    assert stated == "FINDINGS: No pneumothorax. Pleural effusion. IMPRESSION: x."
    assert neutral == "FINDINGS: No pneumothorax. IMPRESSION: x."
    assert keyword_sentence("nodule.") == "Nodule."
    with pytest.raises(ValueError, match="slot"):
        keyword_texts("nodule", "no slot here")
    with pytest.raises(ValueError, match="empty"):
        keyword_sentence("  ")


def test_query_is_the_unit_displacement_the_keyword_causes() -> None:
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return bag_of_words(texts)

    queries = keyword_queries(embed, ["nodule", "atelectasis"], DEFAULT_KEYWORD_CONTEXT)
    assert queries.shape == (2, 5)
    np.testing.assert_allclose(queries, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]], atol=1e-12)  # shared context cancels
    assert len(calls) == 2 and len(calls[1]) == 1  # the neutral report is embedded once for all keywords
    bare = keyword_queries(bag_of_words, ["nodule"], None)
    np.testing.assert_allclose(np.linalg.norm(bare, axis=1), 1.0)
    assert bare[0, 0] < 1.0  # as typed: the word's vector, not the displacement


def test_keyword_context_is_validated_and_can_be_switched_off() -> None:
    assert load_settings().eval.keyword_context == DEFAULT_KEYWORD_CONTEXT
    assert load_settings(overrides={"eval": {"keyword_context": None}}).eval.keyword_context is None
    with pytest.raises(ConfigError, match="eval.keyword_context"):
        load_settings(overrides={"eval": {"keyword_context": "FINDINGS: nothing to fill"}})
