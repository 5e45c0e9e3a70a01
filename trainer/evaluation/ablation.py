"""``medfinder ablate``: the same run with one branch switched off at a time, figures side by side.

Variants (each a set of overrides on top of the chosen config): the full objective, the text sampler
off (whole reports), L_mse off, the fusion off, and the auxiliary label loss (not in the paper) on or off. Every variant trains into its own folder (so an
interrupted ablation resumes), is evaluated on the same held-out gallery, and one table compares them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from config import Settings
from config.loader import deep_merge

logger = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-sampler": {"model": {"sampler": {"enabled": False}}},
    "no-mse": {"loss": {"mse": False}},
    "no-fusion": {"model": {"fusion": False}},
    # the auxiliary label loss (not in the paper) switched on, or off where the config enables it
    "with-labels": {"loss": {"label_weight": 1.0}},
    "no-labels": {"loss": {"label_weight": 0.0}},
}


def variant_settings(base: Settings, overrides: dict[str, Any]) -> Settings:
    """``base`` with ``overrides`` applied and validated again."""
    return Settings.model_validate(deep_merge(base.model_dump(mode="json"), overrides))


def summarise(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one variant's evaluation."""
    from trainer.evaluation.evaluate import TRAINED

    result = payload["results"][TRAINED]
    keyword = result["keyword"]["mean"]
    return {
        "variant": name,
        "N": payload["N"],
        "t2i": {k: result["t2i"][k] for k in ("R@1", "R@5", "R@10", "MdR", "MnR")},
        "i2t": {k: result["i2t"][k] for k in ("R@1", "R@5", "R@10", "MdR", "MnR")},
        "keyword_mean": {k: v for k, v in keyword.items() if k.startswith("P@")},
        "keyword_bare_P@20": result.get("keyword_bare", {}).get("mean", {}).get("P@20"),
        "i2i": {k: v for k, v in result["i2i"].items() if k.startswith("P@")},
    }


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def format_ablation_table(rows: list[dict[str, Any]]) -> str:
    """One line per variant: t→i R@1/5/10, MdR, MnR, mean keyword P@20/50/100 (and P@20 of bare keywords), i→i P@10."""
    header = (f"{'variant':12} {'t2i R@1':>8} {'R@5':>7} {'R@10':>7} {'MdR':>7} {'MnR':>7} | "
              f"{'kw P@20':>8} {'P@50':>6} {'P@100':>6} {'bare P@20':>9} | {'i2i P@10':>8}")
    lines = [f"Ablations, held-out gallery N = {rows[0]['N'] if rows else 0} (full gallery)", header, "-" * len(header)]
    for row in rows:
        t2i, kw = row["t2i"], row["keyword_mean"]
        lines.append(
            f"{row['variant']:12} {t2i['R@1']:8.2f} {t2i['R@5']:7.2f} {t2i['R@10']:7.2f} {t2i['MdR']:7.1f} {t2i['MnR']:7.1f} | "
            f"{kw.get('P@20', float('nan')):8.3f} {kw.get('P@50', float('nan')):6.3f} {kw.get('P@100', float('nan')):6.3f} "
            f"{_or_nan(row.get('keyword_bare_P@20')):9.3f} | "
            f"{row['i2i'].get('P@10', float('nan')):8.3f}"
        )
    return "\n".join(lines)


def logged_training_minutes(metrics_log: Path) -> float | None:
    """Training wall time of a finished run, summed from its per-epoch log (None without a log)."""
    if not metrics_log.is_file():
        return None
    lines = metrics_log.read_text(encoding="utf-8").splitlines()
    return round(sum(json.loads(line).get("epoch_seconds", 0.0) for line in lines if line.strip()) / 60, 2)


def run_ablation(base: Settings, out_dir: Path, variants: list[str]) -> list[dict[str, Any]]:
    """Train and evaluate each variant in ``out_dir/<variant>``; writes ``out_dir/ablation.json``."""
    from trainer.evaluation.evaluate import train_and_evaluate

    rows = []
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
        run_dir = out_dir / name
        finished = run_dir / "eval-test.json"
        if finished.is_file():  # a variant already trained and evaluated: an interrupted ablation resumes
            logger.info("ablation variant %s: reusing %s", name, finished)
            payload = json.loads(finished.read_text(encoding="utf-8"))
            row = summarise(name, payload)
            row["train_minutes"] = logged_training_minutes(run_dir / "metrics.jsonl")
        else:
            result, payload = train_and_evaluate(variant_settings(base, VARIANTS[name]), run_dir)
            row = summarise(name, payload)
            row["train_minutes"] = round(result.seconds / 60, 2)
        rows.append(row)
    table = format_ablation_table(rows)
    (out_dir / "ablation.json").write_text(json.dumps({"variants": rows, "table": table}, indent=2))
    print(table)
    return rows
