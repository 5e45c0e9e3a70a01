"""The ablation command's variants and its side-by-side table (the training itself is covered elsewhere)."""

from __future__ import annotations

from config import load_settings
from trainer.evaluation.ablation import VARIANTS, format_ablation_table, variant_settings


def test_variants_switch_exactly_one_branch() -> None:
    base = load_settings("synthetic-cpu")
    assert variant_settings(base, VARIANTS["full"]) == base
    assert variant_settings(base, VARIANTS["no-sampler"]).model.sampler.enabled is False
    assert variant_settings(base, VARIANTS["no-mse"]).loss.mse is False
    assert variant_settings(base, VARIANTS["no-fusion"]).model.fusion is False
    assert base.loss.label_weight > 0 and variant_settings(base, VARIANTS["no-labels"]).loss.label_weight == 0
    no_mse = variant_settings(base, VARIANTS["no-mse"])
    assert no_mse.model == base.model and no_mse.optim == base.optim


def test_table_lists_every_variant_with_its_figures() -> None:
    rows = [
        {"variant": "full", "N": 250, "t2i": {"R@1": 5.2, "R@5": 20.4, "R@10": 41.6, "MdR": 13.0, "MnR": 30.5},
         "keyword_mean": {"P@20": 0.85, "P@50": 0.8, "P@100": 0.7}, "keyword_bare_P@20": 0.575, "i2i": {"P@10": 0.71}},
        {"variant": "no-mse", "N": 250, "t2i": {"R@1": 4.0, "R@5": 18.0, "R@10": 38.0, "MdR": 15.5, "MnR": 33.0},
         "keyword_mean": {"P@20": 0.8, "P@50": 0.75, "P@100": 0.65}, "i2i": {"P@10": 0.69}},
    ]
    table = format_ablation_table(rows)
    assert "N = 250" in table
    assert "41.60" in table and "38.00" in table and "0.850" in table and "0.690" in table and "0.575" in table
    assert table.index("full") < table.index("no-mse")


def test_an_evaluated_variant_is_reused_not_retrained(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import json

    import trainer.evaluation.evaluate as evaluate
    from trainer.evaluation.ablation import run_ablation
    from trainer.evaluation.evaluate import TRAINED

    def no_training(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a variant with eval-test.json must not be trained again")

    monkeypatch.setattr(evaluate, "train_and_evaluate", no_training)
    run_dir = tmp_path / "full"
    run_dir.mkdir()
    recalls = {"R@1": 1.0, "R@5": 2.0, "R@10": 44.0, "MdR": 9.0, "MnR": 20.0}
    result = {"t2i": recalls, "i2t": recalls,
              "keyword": {"mean": {"P@20": 0.9, "P@50": 0.8, "P@100": 0.7}}, "i2i": {"P@10": 0.75}}
    (run_dir / "eval-test.json").write_text(json.dumps({"N": 250, "results": {TRAINED: result}}))
    (run_dir / "metrics.jsonl").write_text('{"epoch_seconds": 60}\n{"epoch_seconds": 30}\n')
    rows = run_ablation(load_settings("tiny"), tmp_path, ["full"])
    assert rows[0]["t2i"]["R@10"] == 44.0 and rows[0]["train_minutes"] == 1.5
    assert "44.00" in json.loads((tmp_path / "ablation.json").read_text())["table"]
