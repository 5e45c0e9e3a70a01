"""Retrieval metrics and result tables against small cases worked out by hand (numbers in the comments)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.evaluation.metrics import (
    _stable_top_k,
    chance_recall,
    evaluate_embeddings,
    image_to_image_precision,
    keyword_precision,
    precision_at_k,
    ranks_of_ground_truth,
    recall_metrics,
    text_image_metrics,
)
from trainer.evaluation.report import (
    format_image_table,
    format_keyword_table,
    format_retrieval_table,
    write_results_json,
)

# Row i: query i; the diagonal is the match. Worked out row by row:
#   row 0: diag 0.9, nothing higher                  -> rank 1
#   row 1: diag 0.5, higher 0.8 and 0.7              -> rank 3
#   row 2: diag 0.3, higher 0.4                      -> rank 2
#   row 3: diag 0.1, higher 0.4, 0.3, 0.2            -> rank 4
# Columns (image->text, sim.T rows):
#   col 0: [0.9, 0.8, 0.1, 0.4], diag 0.9            -> rank 1
#   col 1: [0.1, 0.5, 0.2, 0.3], diag 0.5            -> rank 1
#   col 2: [0.2, 0.7, 0.3, 0.2], diag 0.3, 0.7 above -> rank 2
#   col 3: [0.3, 0.05, 0.4, 0.1], diag 0.1, 0.3 and 0.4 above -> rank 3
GRADED = np.array(
    [
        [0.9, 0.1, 0.2, 0.3],
        [0.8, 0.5, 0.7, 0.05],
        [0.1, 0.2, 0.3, 0.4],
        [0.4, 0.3, 0.2, 0.1],
    ]
)

# eye(4) with two off-diagonal scores tied with the diagonal: (0, 1) and (2, 3).
TIED = np.eye(4)
TIED[0, 1] = 1.0
TIED[2, 3] = 1.0


def test_identity_all_rank_one() -> None:
    ranks = ranks_of_ground_truth(np.eye(5))
    assert ranks.tolist() == [1, 1, 1, 1, 1]
    m = recall_metrics(np.eye(5), ks=(1, 5))
    assert m["R@1"] == 100.0 and m["R@5"] == 100.0
    assert m["MdR"] == 1.0 and m["MnR"] == 1.0
    assert m["N"] == 5 and m["n_queries"] == 5 and m["n_tied_queries"] == 0


def test_graded_ranks_and_even_median() -> None:
    assert ranks_of_ground_truth(GRADED).tolist() == [1, 3, 2, 4]
    m = recall_metrics(GRADED, ks=(1, 2, 3, 5))
    # R@1 = 1/4 = 25 %, R@2 = 2/4 = 50 %, R@3 = 3/4 = 75 %, R@5 = 100 %.
    assert m["R@1"] == 25.0 and m["R@2"] == 50.0 and m["R@3"] == 75.0 and m["R@5"] == 100.0
    # Even N: median of (1, 2, 3, 4) = (2 + 3) / 2 = 2.5; mean = 10 / 4 = 2.5.
    assert m["MdR"] == 2.5 and m["MnR"] == 2.5
    # No ties: the pessimistic numbers are the same.
    assert m["pessimistic"] == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@5": 100.0, "MdR": 2.5, "MnR": 2.5}


def test_known_permutation() -> None:
    # Text i matches image perm[i]; sim is the one-hot of that permutation.
    perm = np.array([1, 0, 2, 3])
    sim = np.zeros((4, 4))
    sim[np.arange(4), perm] = 1.0
    # Against the true matches every rank is 1.
    assert ranks_of_ground_truth(sim, gt=perm).tolist() == [1, 1, 1, 1]
    # Against the (wrong) diagonal: rows 0 and 1 have 0 on the diagonal and one 1 above it -> rank 2.
    assert ranks_of_ground_truth(sim).tolist() == [2, 2, 1, 1]
    m = recall_metrics(sim, ks=(1,))
    # R@1 = 2/4 = 50 %; median of (1, 1, 2, 2) = 1.5; mean = 6/4 = 1.5.
    assert (m["R@1"], m["MdR"], m["MnR"]) == (50.0, 1.5, 1.5)


def test_ties_optimistic_vs_pessimistic() -> None:
    # Optimistic: nothing is strictly above any diagonal -> ranks (1, 1, 1, 1).
    assert ranks_of_ground_truth(TIED).tolist() == [1, 1, 1, 1]
    # Pessimistic: rows 0 and 2 have two scores >= their diagonal -> ranks (2, 1, 2, 1).
    assert ranks_of_ground_truth(TIED, pessimistic=True).tolist() == [2, 1, 2, 1]
    m = recall_metrics(TIED, ks=(1, 5))
    assert (m["R@1"], m["MdR"], m["MnR"]) == (100.0, 1.0, 1.0)
    # Pessimistic: R@1 = 2/4 = 50 %, median (1, 1, 2, 2) = 1.5, mean 6/4 = 1.5.
    assert (m["pessimistic"]["R@1"], m["pessimistic"]["MdR"], m["pessimistic"]["MnR"]) == (50.0, 1.5, 1.5)
    assert m["n_tied_queries"] == 2


def test_rectangular_with_gt() -> None:
    # 2 queries over 3 gallery items. Row 0: gt 2 scores 0.2, above it 0.5 -> rank 2.
    # Row 1: gt 0 scores 0.7, 0.7 tied at column 2 -> optimistic 1, pessimistic 2.
    sim = np.array([[0.5, 0.1, 0.2], [0.7, 0.1, 0.7]])
    gt = np.array([2, 0])
    assert ranks_of_ground_truth(sim, gt).tolist() == [2, 1]
    assert ranks_of_ground_truth(sim, gt, pessimistic=True).tolist() == [2, 2]
    m = recall_metrics(sim, gt, ks=(1,))
    # N is the gallery size (3): chance R@1 = 100/3 %, MdR = MnR = (3 + 1)/2 = 2.
    assert m["N"] == 3 and m["n_queries"] == 2
    assert m["chance"]["R@1"] == pytest.approx(100.0 / 3) and m["chance"]["MdR"] == 2.0


def test_chance_values() -> None:
    # N = 10: R@1 = 10 %, R@5 = 50 %, R@10 = 100 %, MdR = MnR = 11/2 = 5.5.
    assert chance_recall(10, (1, 5, 10)) == {"R@1": 10.0, "R@5": 50.0, "R@10": 100.0, "MdR": 5.5, "MnR": 5.5}
    # K above N is capped: N = 4, R@5 = 100 %.
    assert chance_recall(4, (1, 5))["R@5"] == 100.0
    # The paper's N = 1,614: R@1 = 100/1614 = 0.062 %, MdR = 807.5.
    big = chance_recall(1614, (1,))
    assert big["R@1"] == pytest.approx(0.06196, abs=1e-5) and big["MdR"] == 807.5
    assert recall_metrics(GRADED, ks=(1, 5, 10))["chance"] == {
        "R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.5
    }


def test_i2t_uses_transpose() -> None:
    # text @ image.T == GRADED when image is the identity.
    out = text_image_metrics(GRADED, np.eye(4), ks=(1, 2))
    t2i, i2t = out["t2i"], out["i2t"]
    # t2i ranks (1, 3, 2, 4): R@1 25 %, R@2 50 %, MdR 2.5, MnR 2.5.
    assert (t2i["R@1"], t2i["R@2"], t2i["MdR"], t2i["MnR"]) == (25.0, 50.0, 2.5, 2.5)
    # i2t ranks (1, 1, 2, 3): R@1 50 %, R@2 75 %, median (1, 2)/2 = 1.5, mean 7/4 = 1.75.
    assert (i2t["R@1"], i2t["R@2"], i2t["MdR"], i2t["MnR"]) == (50.0, 75.0, 1.5, 1.75)


def test_text_image_validation() -> None:
    with pytest.raises(ValueError, match="paired"):
        text_image_metrics(np.eye(3), np.eye(4)[:, :3][:2])
    with pytest.raises(ValueError, match="widths"):
        text_image_metrics(np.eye(3), np.ones((3, 2)))
    bad = np.eye(3)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        text_image_metrics(bad, np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        ranks_of_ground_truth(bad)


def test_precision_at_k_ties_and_k_above_n() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.9])
    relevant = np.array([False, False, True, True, True, True])
    # Stable descending order: 0.9 at (1, 5), then 0.5 at (0, 2, 3), then 0.1 at 4 -> [1, 5, 0, 2, 3, 4];
    # relevance in that order: F T F T T T.
    out = precision_at_k(scores, relevant, ks=(1, 2, 3, 4, 10))
    assert out["P@1"] == 0.0  # 0/1
    assert out["P@2"] == 0.5  # 1/2
    assert out["P@3"] == pytest.approx(1 / 3)  # item 0 wins the 0.5 tie by index: 1/3 (not 2/3)
    assert out["P@4"] == 0.5  # 2/4
    assert out["P@10"] == pytest.approx(4 / 6)  # K = 10 > N = 6: K_effective 6, 4 relevant
    assert out["K_effective"] == {"P@1": 1, "P@2": 2, "P@3": 3, "P@4": 4, "P@10": 6}
    assert out["N"] == 6 and out["positives"] == 4


def test_stable_top_k_matches_stable_argsort() -> None:
    # Integer-valued scores force many ties, including at the K-th place.
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(300, 200)).astype(np.float64)
    scores[:5] = rng.standard_normal((5, 200))  # and some rows without ties
    for k in (1, 7, 50, 200, 500):
        expected = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, 200)]
        assert np.array_equal(_stable_top_k(scores, k), expected)


def test_ranks_match_a_loop() -> None:
    rng = np.random.default_rng(1)
    sim = rng.integers(0, 4, size=(30, 40)).astype(np.float64)
    gt = rng.integers(0, 40, size=30)
    loop_opt = [1 + sum(sim[i, j] > sim[i, gt[i]] for j in range(40)) for i in range(30)]
    loop_pes = [sum(sim[i, j] >= sim[i, gt[i]] for j in range(40)) for i in range(30)]
    assert ranks_of_ground_truth(sim, gt).tolist() == loop_opt
    assert ranks_of_ground_truth(sim, gt, pessimistic=True).tolist() == loop_pes


# Keyword gallery: 6 volumes in 2-D, keyword queries "nodule" = x axis and "effusion" = y axis.
KW_IMAGES = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]])
KW_LABELS = [{"nodule"}, {"Nodule ", "effusion"}, {"effusion"}, set(), set(), {"calcified nodule"}]
KW_QUERIES = np.array([[1.0, 0.0], [0.0, 1.0]])


def test_keyword_precision_from_labels() -> None:
    out = keyword_precision(KW_QUERIES, KW_IMAGES, KW_LABELS, ["nodule", "effusion"], ks=(1, 2, 3))
    # nodule scores (x): [1, .8, .6, 0, .8, -1] -> order [0, 1, 4, 2, 3, 5]; relevant {0, 1}
    # ("calcified nodule" is another label, not a match) -> T T F F F F: P@1 1, P@2 1, P@3 2/3.
    nodule = out["nodule"]
    assert (nodule["P@1"], nodule["P@2"]) == (1.0, 1.0) and nodule["P@3"] == pytest.approx(2 / 3)
    assert nodule["positives"] == 2 and nodule["prevalence"] == pytest.approx(2 / 6)
    # ideal: min(2, K)/K -> 1, 1, 2/3.
    assert nodule["ideal"] == pytest.approx({"P@1": 1.0, "P@2": 1.0, "P@3": 2 / 3})
    # effusion scores (y): [0, .6, .8, 1, .6, 0] -> order [3, 2, 1, 4, 0, 5] (1 before 4 on the tie);
    # relevant {1, 2} -> F T T F F F: P@1 0, P@2 1/2, P@3 2/3.
    effusion = out["effusion"]
    assert (effusion["P@1"], effusion["P@2"]) == (0.0, 0.5) and effusion["P@3"] == pytest.approx(2 / 3)
    # mean over both: P@1 0.5, P@2 0.75, P@3 2/3, prevalence 1/3.
    mean = out["mean"]
    assert (mean["P@1"], mean["P@2"]) == (0.5, 0.75) and mean["P@3"] == pytest.approx(2 / 3)
    assert mean["prevalence"] == pytest.approx(1 / 3) and mean["n_keywords"] == 2

    # The same ground truth as an [N, Q] boolean matrix gives the same numbers.
    matrix = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [0, 0]], dtype=bool)
    assert keyword_precision(KW_QUERIES, KW_IMAGES, matrix, ["nodule", "effusion"], ks=(1, 2, 3)) == out

    # Merging a sub-type on purpose: 3 positives, prevalence 3/6; volume 5 scores last, so P@3 stays 2/3.
    merged = keyword_precision(
        KW_QUERIES, KW_IMAGES, KW_LABELS, ["nodule", "effusion"], ks=(3,),
        keyword_labels={"nodule": {"nodule", "calcified nodule"}},
    )
    assert merged["nodule"]["positives"] == 3 and merged["nodule"]["prevalence"] == 0.5
    assert merged["nodule"]["P@3"] == pytest.approx(2 / 3)


def test_keyword_without_positives_left_out_of_mean() -> None:
    out = keyword_precision(
        np.vstack([KW_QUERIES, [[0.6, 0.8]]]), KW_IMAGES, KW_LABELS, ["nodule", "effusion", "emphysema"], ks=(1,)
    )
    assert out["emphysema"]["positives"] == 0 and out["emphysema"]["P@1"] == 0.0
    # Mean P@1 of nodule (1) and effusion (0) only = 0.5.
    assert out["mean"]["P@1"] == 0.5 and out["mean"]["n_keywords"] == 2


# Image->image gallery. Dot products: e0.e1 = .6, e0.e2 = .8, e0.e3 = 0, e1.e2 = .96, e1.e3 = .8, e2.e3 = .6.
I2I_IMAGES = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
I2I_LABELS = [{"a"}, {"a"}, {"b"}, set()]


def test_image_to_image_excludes_self() -> None:
    out = image_to_image_precision(I2I_IMAGES, I2I_LABELS, ks=(1, 2, 3, 5))
    # q0 {a}: others 1 (.6), 2 (.8), 3 (0) -> [2, 1, 3]; relevant {1} -> F T F: 0, 1/2, 1/3
    # q1 {a}: others 0 (.6), 2 (.96), 3 (.8) -> [2, 3, 0]; relevant {0} -> F F T: 0, 0, 1/3
    # q2 {b}: nobody else has b -> 0, 0, 0
    # q3 {} (normal): no other unlabelled volume -> 0, 0, 0
    # Including self would put each query first (self-similarity 1 beats every other score) and every
    # query is relevant to itself, so P@1 would be 1.0 instead of 0.
    assert out["P@1"] == 0.0
    assert out["P@2"] == pytest.approx(0.5 / 4)  # 0.125
    assert out["P@3"] == pytest.approx((1 / 3 + 1 / 3) / 4)  # 1/6
    assert out["P@5"] == pytest.approx(1 / 6)  # K = 5 > N - 1 = 3 -> K_effective 3
    assert out["K_effective"] == {"P@1": 1, "P@2": 2, "P@3": 3, "P@5": 3}
    # chance: relevant fraction among the 3 others: 1/3, 1/3, 0, 0 -> mean 1/6.
    assert out["chance"]["P@1"] == pytest.approx(1 / 6) and out["chance"]["P@5"] == pytest.approx(1 / 6)
    assert out["N"] == 4 and out["gallery_size"] == 3 and out["n_queries_without_relevant"] == 2
    # Same answer from an [N, L] boolean matrix.
    matrix = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=bool)
    assert image_to_image_precision(I2I_IMAGES, matrix, ks=(1, 2, 3, 5)) == out


def test_image_to_image_normal_queries_and_ties() -> None:
    # Volumes 0 and 2 are normal, 1 has {x}; all three embeddings are identical, so every score ties and
    # the order is by index. q0 (normal): others [1, 2] -> F T: P@1 0. q1 {x}: [0, 2] -> F F: 0.
    # q2 (normal): [0, 1] -> T F: P@1 1. Mean P@1 = 1/3; P@2: (1/2 + 0 + 1/2)/3 = 1/3.
    out = image_to_image_precision(np.ones((3, 2)), [set(), {"x"}, set()], ks=(1, 2))
    assert out["P@1"] == pytest.approx(1 / 3) and out["P@2"] == pytest.approx(1 / 3)
    # chance: q0 1/2, q1 0, q2 1/2 -> 1/3.
    assert out["chance"]["P@1"] == pytest.approx(1 / 3)


def test_evaluate_embeddings_structure() -> None:
    result = evaluate_embeddings(
        GRADED, np.eye(4), I2I_LABELS, {"a": np.array([1.0, 0, 0, 0])}, ks=(1,), precision_ks=(2,), image_ks=(1,)
    )
    assert set(result) == {"N", "t2i", "i2t", "keyword", "i2i"} and result["N"] == 4
    assert result["t2i"]["R@1"] == 25.0 and result["i2t"]["R@1"] == 50.0
    assert set(result["keyword"]) == {"a", "mean"}
    assert set(evaluate_embeddings(GRADED, np.eye(4))) == {"N", "t2i", "i2t"}
    with pytest.raises(ValueError, match="labels"):
        evaluate_embeddings(GRADED, np.eye(4), None, {"a": np.ones(4)})


def test_retrieval_table_renders_numbers() -> None:
    results = {
        "MedFinder (ours)": {"N": 4, **text_image_metrics(GRADED, np.eye(4), ks=(1, 5, 10))},
        "untrained baseline": {"N": 4, **text_image_metrics(TIED, np.eye(4), ks=(1, 5, 10))},
    }
    table = format_retrieval_table(results)
    assert "N = 4" in table and "full gallery" in table
    assert "Text→Image" in table and "Image→Text" in table
    for name in ("MedFinder (ours)", "untrained baseline", "chance"):
        assert name in table
    ours = next(line for line in table.splitlines() if line.startswith("MedFinder"))
    # t2i 25.00 ... MdR 2.50 MnR 2.50; i2t 50.00 ... MnR 1.75.
    assert ours.split() == ["MedFinder", "(ours)", "|", "25.00", "100.00", "100.00", "2.50", "2.50", "|",
                            "50.00", "100.00", "100.00", "1.50", "1.75"]
    # The tied method gets a note with its pessimistic numbers (R@1 50 %, MnR 1.5).
    assert "ties: untrained baseline" in table and "pessimistic R@1 = 50.00 / 50.00" in table
    pessimistic = format_retrieval_table(results, pessimistic=True)
    baseline = next(line for line in pessimistic.splitlines() if line.startswith("untrained"))
    assert baseline.split()[3:8] == ["50.00", "100.00", "100.00", "1.50", "1.50"]
    with pytest.raises(ValueError, match="same gallery"):
        format_retrieval_table({**results, "other": {"N": 5, **text_image_metrics(np.eye(5), np.eye(5))}})


def test_keyword_and_image_tables_render_numbers() -> None:
    results = {
        "MedFinder (ours)": evaluate_embeddings(
            KW_IMAGES, KW_IMAGES, KW_LABELS, {"nodule": KW_QUERIES[0], "effusion": KW_QUERIES[1]},
            precision_ks=(1, 2, 3), image_ks=(1, 2, 10),
        )
    }
    table = format_keyword_table(results)
    assert "N = 6" in table and "nodule" in table and "effusion" in table and "mean" in table
    ours = next(line for line in table.splitlines() if line.startswith("MedFinder"))
    # nodule 1, 1, 2/3 | effusion 0, 1/2, 2/3 | mean 0.5, 0.75, 2/3.
    assert ours.split()[3:] == ["1.000", "1.000", "0.667", "|", "0.000", "0.500", "0.667", "|",
                                "0.500", "0.750", "0.667"]
    chance = next(line for line in table.splitlines() if line.startswith("chance"))
    assert chance.count("0.333") == 9  # prevalence 2/6 everywhere
    assert "nodule 2, effusion 2" in table

    image_table = format_image_table(results)
    assert "Image→Image" in image_table and "chance" in image_table and "P@10" in image_table
    assert "P@10 uses K = 5" in image_table
    i2i = results["MedFinder (ours)"]["i2i"]
    assert f"{i2i['P@1']:.3f}" in image_table and f"{i2i['chance']['P@1']:.3f}" in image_table


def test_write_results_json(tmp_path: Path) -> None:
    payload = {
        "b": np.float32(0.5), "a": {"n": np.int64(3), "arr": np.arange(3), "flag": np.bool_(True)},
        "t": (1, 2), "nan": float("nan"), "path": Path("x/y"),
    }
    target = tmp_path / "out" / "results.json"
    write_results_json(target, payload)
    text = target.read_text()
    assert json.loads(text) == {
        "a": {"arr": [0, 1, 2], "flag": True, "n": 3}, "b": 0.5, "nan": None, "path": "x/y", "t": [1, 2]
    }
    assert text.index('"a"') < text.index('"b"') and '\n  "a": {' in text
    assert list(target.parent.iterdir()) == [target]  # no temporary left behind


def test_large_gallery_is_fast() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1500, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = [{f"l{i % 7}"} if i % 3 else set() for i in range(1500)]
    out = evaluate_embeddings(emb, emb, labels, {"l1": emb[1]}, precision_ks=(20, 50, 100))
    # Self-paired embeddings: every text finds its own image first.
    assert out["t2i"]["R@1"] == 100.0 and out["i2t"]["MnR"] == 1.0
    assert 0.0 <= out["i2i"]["P@10"] <= 1.0
