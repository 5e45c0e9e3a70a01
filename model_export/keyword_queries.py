"""Keyword queries embedded in the context of a report, shared by evaluation and serving.

Why: a model trained on whole reports through a frozen sentence encoder maps a bare word such as
"atelectasis" badly. Reports mention most findings whether present or negated ("No atelectasis."), so
the word alone lands between both kinds of report, and a one-word text is unlike anything the text
projection was trained on. The query used instead is the *displacement* that stating the finding causes
in a fixed, neutral report: ``embed(context with "Atelectasis.") - embed(context without it)``. Only
text goes in (no labels, no images), so it works for any keyword a user types. On the synthetic
benchmark this raised mean keyword P@20 from 0.58 (bare keywords) to 0.85 for the same checkpoint.
Pure Python and numpy: serving has no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from config.settings import DEFAULT_KEYWORD_CONTEXT, FINDING_SLOT

__all__ = ["DEFAULT_KEYWORD_CONTEXT", "FINDING_SLOT", "keyword_queries", "keyword_sentence", "keyword_texts"]


def _squash(text: str) -> str:
    """Single spaces, no leading/trailing blanks (the slot may leave a double space when emptied)."""
    return " ".join(text.split())


def keyword_sentence(keyword: str) -> str:
    """``"pleural effusion"`` -> ``"Pleural effusion."``: the keyword stated as a finding."""
    words = _squash(keyword).rstrip(".")
    if not words:
        raise ValueError("empty keyword")
    return words[:1].upper() + words[1:] + "."


def keyword_texts(keyword: str, context: str = DEFAULT_KEYWORD_CONTEXT) -> tuple[str, str]:
    """The context with the keyword stated in its slot, and the same context without it."""
    if FINDING_SLOT not in context:
        raise ValueError(f"a keyword context needs the slot {FINDING_SLOT!r}: {context!r}")
    return _squash(context.replace(FINDING_SLOT, keyword_sentence(keyword))), _squash(context.replace(FINDING_SLOT, ""))


def keyword_queries(
    embed: Callable[[list[str]], np.ndarray], keywords: Sequence[str], context: str | None = DEFAULT_KEYWORD_CONTEXT
) -> np.ndarray:
    """``[Q, E]`` unit query vectors, one per keyword; ``context=None`` embeds the keywords as typed.

    ``embed`` maps a list of texts to ``[n, E]`` embeddings in the joint space (the caller's text tower).
    """
    if context is None:
        vectors = np.asarray(embed(list(keywords)), dtype=np.float64)
    else:
        stated, neutral = zip(*(keyword_texts(k, context) for k in keywords))
        with_finding = np.asarray(embed(list(stated)), dtype=np.float64)
        without = np.asarray(embed([neutral[0]]), dtype=np.float64)  # the same neutral text for every keyword
        vectors = with_finding - without
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
