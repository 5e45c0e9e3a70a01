"""Report text handling shared by training and serving: the sampler S(T, L) and its deterministic twin.

Training draws one random contiguous window of L words per report (the paper's text sampler).
Evaluation and serving must be deterministic, so a report is cut into consecutive L-word chunks
(at most ``max_chunks``; the rest is dropped, which is logged by callers that care), each chunk is
embedded, and the chunk embeddings are mean-pooled and re-normalised. A report no longer than L words
is one chunk, so short queries ("pleural effusion") are embedded exactly as typed.
Pure Python on purpose: serving has no torch.
"""

from __future__ import annotations

import random
import re

_WHITESPACE = re.compile(r"\s+")


class EmptyReportError(ValueError):
    """A report or query with no words: there is nothing to embed."""


def split_words(text: str) -> list[str]:
    """Whitespace tokenisation, as the paper's sampler does (punctuation stays attached to words)."""
    return [word for word in _WHITESPACE.split(text.strip()) if word]


def require_text(text: str) -> list[str]:
    """The words of ``text``, or :class:`EmptyReportError` when there are none."""
    if not isinstance(text, str):
        raise EmptyReportError(f"report text must be a string, got {type(text).__name__}")
    words = split_words(text)
    if not words:
        raise EmptyReportError("report text is empty")
    return words


def sample_window(text: str, window_words: int, rng: random.Random, start_stride: int = 1) -> str:
    """S(T, L): a uniformly placed contiguous window of ``window_words`` words (the whole text if shorter).

    Starts are drawn from multiples of ``start_stride`` (plus the last possible start, so the end of
    the report stays reachable); ``start_stride=1`` is the paper's sampler.
    """
    words = require_text(text)
    if len(words) <= window_words:
        return " ".join(words)
    last = len(words) - window_words
    starts = list(range(0, last + 1, start_stride))
    if starts[-1] != last:
        starts.append(last)
    start = rng.choice(starts)
    return " ".join(words[start : start + window_words])


def deterministic_chunks(text: str, window_words: int, max_chunks: int) -> list[str]:
    """Consecutive ``window_words``-word chunks from the start, at most ``max_chunks`` of them."""
    words = require_text(text)
    chunks = [" ".join(words[i : i + window_words]) for i in range(0, len(words), window_words)]
    return chunks[:max_chunks]


def inference_chunks(text: str, window_words: int, max_chunks: int, sampler_enabled: bool = True) -> list[str]:
    """The texts whose embeddings are mean-pooled for one report at evaluation and serving time.

    A model trained with the sampler saw ``window_words``-word windows, so long reports are cut into
    such chunks; one trained without it saw whole reports (truncated by the tokenizer), so it gets one.
    """
    if sampler_enabled:
        return deterministic_chunks(text, window_words, max_chunks)
    return [" ".join(require_text(text))]
