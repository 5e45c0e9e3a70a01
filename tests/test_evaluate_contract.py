"""Issue 2's contract: ``medfinder evaluate`` writes flat top-level figures (n, chance, t2i, i2t, keyword, baseline)
that are copies of the numbers in ``results``, so tools and CI can read them without knowing the method names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.evaluation.evaluate import TRAINED, UNTRAINED, contract_figures, evaluate_checkpoint

RANK_KEYS = {"R@1", "R@5", "R@10", "MdR", "MnR"}
KEYWORD_KEYS = {"P@20", "P@50", "P@100"}
CONTRACT_KEYS = {"n", "chance", "t2i", "i2t", "keyword", "baseline"}


def method_entry(offset: float, n: int = 40) -> dict[str, Any]:
    """One method's results as evaluate_embeddings shapes them, every figure distinct so a mix-up shows."""

    def direction(base: float) -> dict[str, Any]:
        return {
            "N": n, "n_queries": n, "R@1": base + 1, "R@5": base + 5, "R@10": base + 10, "MdR": base + 0.5,
            "MnR": base + 0.25, "pessimistic": {"R@1": -1.0}, "n_tied_queries": 0,
            "chance": {"R@1": 2.5, "R@5": 12.5, "R@10": 25.0, "MdR": 20.5, "MnR": 20.5},
        }

    def keyword(base: float) -> dict[str, Any]:
        return {"P@20": base + 0.01, "P@50": base + 0.02, "P@100": base + 0.03, "prevalence": 0.5, "positives": 20}

    return {
        "N": n,
        "t2i": direction(offset),
        "i2t": direction(offset + 100),
        "keyword": {"nodule": keyword(0.1), "effusion": keyword(0.2), "mean": keyword(0.9)},
        "keyword_bare": {"nodule": keyword(0.6), "effusion": keyword(0.7), "mean": keyword(0.8)},
        "i2i": {"P@1": 0.3},
    }


def test_contract_figures_maps_results_by_hand() -> None:
    payload = {"N": 40, "results": {TRAINED: method_entry(10.0), UNTRAINED: method_entry(50.0)}}
    contract = contract_figures(payload)
    assert set(contract) == CONTRACT_KEYS
    assert contract["n"] == 40
    assert contract["chance"] == {"R@10": 25.0}
    assert contract["t2i"] == {"R@1": 11.0, "R@5": 15.0, "R@10": 20.0, "MdR": 10.5, "MnR": 10.25}
    assert contract["i2t"] == {"R@1": 111.0, "R@5": 115.0, "R@10": 120.0, "MdR": 110.5, "MnR": 110.25}
    # in-context keyword figures, not keyword_bare; the mean is not a keyword
    assert contract["keyword"] == {
        "nodule": {"P@20": pytest.approx(0.11), "P@50": pytest.approx(0.12), "P@100": pytest.approx(0.13)},
        "effusion": {"P@20": pytest.approx(0.21), "P@50": pytest.approx(0.22), "P@100": pytest.approx(0.23)},
    }
    baseline = contract["baseline"]
    assert set(baseline) == {"t2i", "i2t", "keyword"}
    assert baseline["t2i"]["R@1"] == 51.0 and baseline["i2t"]["MnR"] == 150.25
    assert baseline["keyword"] == contract["keyword"]  # the same hand-made keyword block in both


def test_contract_without_baselines_or_r10() -> None:
    """--no-baselines gives baseline null; a run without K = 10 keeps the keys (null figures, chance from N)."""
    entry = method_entry(10.0, n=8)
    for direction in ("t2i", "i2t"):
        del entry[direction]["R@10"]
        del entry[direction]["chance"]["R@10"]
    contract = contract_figures({"N": 8, "results": {TRAINED: entry}})
    assert contract["baseline"] is None
    assert set(contract["t2i"]) == RANK_KEYS and contract["t2i"]["R@10"] is None
    assert contract["chance"] == {"R@10": 100.0}  # 100 * min(10, 8) / 8


def assert_method_shape(block: dict[str, Any], keywords: list[str]) -> None:
    assert set(block) == {"t2i", "i2t", "keyword"}
    for direction in ("t2i", "i2t"):
        figures = block[direction]
        assert set(figures) == RANK_KEYS
        assert all(isinstance(value, (int, float)) for value in figures.values())
        assert figures["R@1"] <= figures["R@5"] <= figures["R@10"]
    assert sorted(block["keyword"]) == sorted(keywords)
    for figures in block["keyword"].values():
        assert set(figures) == KEYWORD_KEYS
        assert all(isinstance(value, (int, float)) for value in figures.values())


def assert_copied(block: dict[str, Any], entry: dict[str, Any]) -> None:
    """Every contract figure equals its source in ``results`` (fails if the mapping points elsewhere)."""
    for direction in ("t2i", "i2t"):
        assert block[direction] == {key: entry[direction][key] for key in RANK_KEYS}
    for name, figures in block["keyword"].items():
        assert figures == {key: entry["keyword"][name][key] for key in KEYWORD_KEYS}


def test_evaluate_writes_contract(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real ``medfinder evaluate`` path (the function its handler calls) on the tiny checkpoint."""
    out = tmp_path / "e.json"
    evaluate_checkpoint(tiny_checkpoint, out=out, progress=False)
    written = json.loads(out.read_text(encoding="utf-8"))

    assert CONTRACT_KEYS <= set(written)
    assert {"N", "results", "tables", "split", "checkpoint"} <= set(written)  # the old sections stay
    assert written["n"] == written["N"] >= 8
    trained = written["results"][TRAINED]
    keywords = [name for name in trained["keyword"] if name != "mean"]
    assert keywords
    assert written["chance"] == {"R@10": trained["t2i"]["chance"]["R@10"]}
    assert written["chance"]["R@10"] == pytest.approx(100.0 * min(10, written["N"]) / written["N"])

    contract = {key: written[key] for key in ("t2i", "i2t", "keyword")}
    assert_method_shape(contract, keywords)
    assert_copied(contract, trained)
    assert written["baseline"] is not None
    assert_method_shape(written["baseline"], keywords)
    assert_copied(written["baseline"], written["results"][UNTRAINED])


def test_evaluate_without_baselines_writes_null_baseline(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    evaluate_checkpoint(tiny_checkpoint, out=out, baselines=False, progress=False)  # --no-baselines
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["baseline"] is None
    assert UNTRAINED not in written["results"]
    assert_copied({key: written[key] for key in ("t2i", "i2t", "keyword")}, written["results"][TRAINED])
