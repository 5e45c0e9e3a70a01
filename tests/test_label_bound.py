"""The supervised label reference (`medfinder label-bound`): AUC by hand, and one tiny run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from config import load_settings
from trainer.evaluation.label_bound import format_label_bound, roc_auc, run_label_bound, score_labels

REPO = Path(__file__).resolve().parent.parent


def test_roc_auc_matches_hand_computed_cases() -> None:
    positive = np.array([1, 0, 1, 0], dtype=bool)
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), positive) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), positive) == 0.0
    # pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.1) = 1, (0.3, 0.5) = 0, (0.3, 0.1) = 1 -> 2.5 / 4
    assert roc_auc(np.array([0.5, 0.5, 0.3, 0.1]), positive) == 0.625
    assert roc_auc(np.ones(4), positive) == 0.5
    assert math.isnan(roc_auc(np.arange(4.0), np.zeros(4, dtype=bool)))


def test_score_labels_reports_auc_and_precision_per_label() -> None:
    logits = np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 3.0]])
    targets = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=np.float32)
    scores = score_labels(logits, targets, ("a", "b"), (2,))
    assert scores["a"]["AUC"] == 1.0 and scores["a"]["P@2"] == 1.0
    assert scores["b"]["AUC"] == 2 / 3 and scores["b"]["P@2"] == 0.5
    assert scores["mean"]["P@2"] == 0.75


def test_label_bound_trains_the_tower_on_labels(tmp_path: Path) -> None:
    settings = load_settings("tiny", overrides={"paths": {"work_dir": str(tmp_path)}, "train": {"progress": False, "epochs": 1}})
    result = run_label_bound(settings, tmp_path / "bound.json", progress=False)
    assert json.loads((tmp_path / "bound.json").read_text())["epochs"] == 1
    assert set(result["labels"]) == set(settings.loss.label_names)
    held = result["held_out"]
    assert held["N"] > 0 and 0.0 <= held["mean"]["P@20"] <= 1.0
    assert "mean" in format_label_bound(result)


def test_label_bound_cli(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "trainer", "label-bound", "--config", "tiny", "--set", f"paths.work_dir={tmp_path}",
         "--set", "train.epochs=1", "--set", "train.progress=false"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Supervised label reference" in completed.stdout
