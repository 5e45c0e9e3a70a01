"""The text sampler S(T, L) and its deterministic twin used at evaluation and serving."""

from __future__ import annotations

import random

import pytest

from model_export.text_windows import (
    EmptyReportError,
    deterministic_chunks,
    inference_chunks,
    sample_window,
    split_words,
)

REPORT = " ".join(f"w{i}" for i in range(250))


def test_window_is_contiguous_and_of_length_l() -> None:
    rng = random.Random(0)
    for _ in range(50):
        words = sample_window(REPORT, 100, rng).split()
        start = int(words[0][1:])
        assert words == [f"w{i}" for i in range(start, start + 100)]


def test_window_positions_cover_the_report() -> None:
    rng = random.Random(1)
    starts = {int(sample_window(REPORT, 100, rng).split()[0][1:]) for _ in range(2000)}
    assert min(starts) == 0 and max(starts) == 150 and len(starts) > 140


def test_start_stride_limits_starts_but_keeps_the_end() -> None:
    rng = random.Random(2)
    starts = {int(sample_window(REPORT, 100, rng, start_stride=40).split()[0][1:]) for _ in range(500)}
    assert starts == {0, 40, 80, 120, 150}


def test_short_report_is_whole() -> None:
    assert sample_window("no  pleural\neffusion", 100, random.Random(0)) == "no pleural effusion"


def test_deterministic_chunks() -> None:
    chunks = deterministic_chunks(REPORT, 100, max_chunks=8)
    assert [len(c.split()) for c in chunks] == [100, 100, 50]
    assert " ".join(chunks) == REPORT
    assert deterministic_chunks(REPORT, 100, max_chunks=2) == chunks[:2]
    assert inference_chunks(REPORT, 100, 8, sampler_enabled=False) == [REPORT]


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_is_refused(text: str) -> None:
    with pytest.raises(EmptyReportError):
        sample_window(text, 10, random.Random(0))
    with pytest.raises(EmptyReportError):
        deterministic_chunks(text, 10, 2)
    assert split_words(text) == []
