"""``medfinder evaluate``: the paper's retrieval evaluation of a checkpoint on a held-out split.

Computes, over the FULL gallery of the split: text→image and image→text R@K/MdR/MnR, keyword
retrieval P@K (ground truth from labels), and image→image P@K by shared labels (query excluded).
The same numbers are computed for two references in the same run: chance, and non-learned image
baselines — the same architecture with random (untrained) weights, and raw downsampled voxels
compared by cosine (image→image only, as raw voxels have no text side).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Settings
from model_export.keyword_queries import keyword_queries
from trainer.data.row_checks import RowPolicy
from trainer.data.sources import cache_dir_for, manifest_rows, resolve_manifest
from trainer.data.volumes import VolumeSet, load_volume_set
from trainer.engine.embedding import embed_reports, embed_volume_arrays
from trainer.engine.loop import TrainResult, build_model, load_trained_model, seed_everything, train
from trainer.engine.text_features import TextFeatureCache
from trainer.evaluation.metrics import (MEAN_KEY, chance_recall, evaluate_embeddings, image_to_image_precision,
                                        keyword_precision)
from trainer.evaluation.report import (
    format_image_table,
    format_keyword_table,
    format_retrieval_table,
    write_results_json,
)
from trainer.model.medfinder import MedFinder

logger = logging.getLogger(__name__)

TRAINED = "MedFinder (trained)"
UNTRAINED = "untrained MedFinder (random init)"
RAW_VOXELS = "raw voxels, cosine (non-learned)"

# The flat figures every ``eval-<split>.json`` carries at its top level (issue 2), whatever the configured Ks.
CONTRACT_RANK_KEYS: tuple[str, ...] = ("R@1", "R@5", "R@10", "MdR", "MnR")
CONTRACT_KEYWORD_KEYS: tuple[str, ...] = ("P@20", "P@50", "P@100")
CONTRACT_CHANCE_K = 10


def raw_voxel_embeddings(arrays: np.ndarray, size: int = 16) -> np.ndarray:
    """A non-learned image descriptor: block-averaged voxels, centred and L2-normalised."""
    volumes = torch.as_tensor(arrays).float()
    pooled = torch.nn.functional.adaptive_avg_pool3d(volumes, (size // 2, size, size)).flatten(1)
    pooled = pooled - pooled.mean(dim=0, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def embed_and_score(model: MedFinder, gallery: VolumeSet, settings: Settings, device: torch.device) -> dict[str, Any]:
    """All metrics for one model on one gallery."""
    cache = TextFeatureCache(model.text_encoder)
    images = embed_volume_arrays(model, gallery.arrays, settings.eval.batch_size, device)
    texts = embed_reports(model, cache, gallery.reports, settings.model.sampler, device)
    names = list(settings.eval.keywords)

    def embed(batch: list[str]) -> np.ndarray:
        return embed_reports(model, cache, batch, settings.model.sampler, device)

    queries = keyword_queries(embed, names, settings.eval.keyword_context)
    result = evaluate_embeddings(
        texts, images, gallery.labels, keyword_emb=dict(zip(names, queries)),
        ks=settings.eval.recall_ks, precision_ks=settings.eval.precision_ks, image_ks=settings.eval.image_precision_ks,
    )
    if settings.eval.keyword_context is not None:  # the bare keywords as typed, for comparison
        result["keyword_bare"] = keyword_precision(
            keyword_queries(embed, names, None), images, gallery.labels, names, settings.eval.precision_ks
        )
    return result


def load_gallery(settings: Settings, split: str, policy: RowPolicy, progress: bool) -> VolumeSet:
    manifest = resolve_manifest(settings, progress=progress)
    rows = [row for row in manifest_rows(manifest) if row.split == split]
    if not rows:
        raise ValueError(f"manifest {manifest} has no rows in split {split!r}")
    return load_volume_set(rows, settings.preprocessing, policy, cache_dir_for(settings, manifest), progress, f"preprocess {split}")


def evaluate_checkpoint(
    checkpoint: Path,
    split: str = "test",
    out: Path | None = None,
    manifest: Path | None = None,
    baselines: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split``; print the tables and write ``eval-<split>.json`` beside it."""
    model, state, settings = load_trained_model(checkpoint)
    if manifest is not None:
        settings.data.manifest = manifest
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = RowPolicy(settings.data.on_bad_row)
    gallery = load_gallery(settings, split, policy, progress)

    model = model.to(device)
    results: dict[str, Any] = {TRAINED: embed_and_score(model, gallery, settings, device)}
    if baselines:
        seed_everything(settings.train.seed)
        untrained = build_model(settings, text_encoder=model.text_encoder).to(device)
        results[UNTRAINED] = embed_and_score(untrained, gallery, settings, device)
    payload: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "split": split,
        "N": len(gallery),
        "gallery": "full",
        "skipped_rows": policy.summary(),
        "checkpoint_epoch": state["epoch"] + 1,
        "best": state.get("best"),
        "results": results,
    }
    if baselines:
        payload["raw_voxel_i2i"] = image_to_image_precision(
            raw_voxel_embeddings(gallery.arrays), gallery.labels, settings.eval.image_precision_ks
        )
    tables = render_tables(payload)
    payload["tables"] = tables
    payload.update(contract_figures(payload))
    out = out or Path(checkpoint).with_name(f"eval-{split}.json")
    write_results_json(out, payload)
    print(tables)
    print(f"results written to {out}")
    return payload


def _contract_method(entry: dict[str, Any]) -> dict[str, Any]:
    """One method's contract figures: both retrieval directions and the in-context keyword P@K per finding."""
    keywords = entry.get("keyword", {})
    return {
        "t2i": {key: entry["t2i"].get(key) for key in CONTRACT_RANK_KEYS},
        "i2t": {key: entry["i2t"].get(key) for key in CONTRACT_RANK_KEYS},
        "keyword": {
            name: {key: figures.get(key) for key in CONTRACT_KEYWORD_KEYS}
            for name, figures in keywords.items()
            if name != MEAN_KEY
        },
    }


def contract_figures(payload: dict[str, Any]) -> dict[str, Any]:
    """Issue 2's contract: a stable, flat shape for tools and CI to read, copied from ``payload["results"]``.

    ``{"n", "chance": {"R@10"}, "t2i", "i2t", "keyword", "baseline"}``; ``t2i``/``i2t`` hold the trained
    model's R@1/R@5/R@10 (%), MdR, MnR; ``keyword`` its P@20/50/100 (fractions) per finding with the in-context
    queries; ``baseline`` the untrained model in the same shape, or None without baselines. Nothing is
    recomputed: chance R@10 is the one :func:`recall_metrics` stored (100*min(10, N)/N %, the same both ways).
    A K the run was not configured for is null, so the keys never change.
    """
    results = payload["results"]
    trained = results[TRAINED]
    chance = trained["t2i"]["chance"]
    key = f"R@{CONTRACT_CHANCE_K}"
    chance_r10 = chance[key] if key in chance else chance_recall(payload["N"], (CONTRACT_CHANCE_K,))[key]
    return {
        "n": payload["N"],
        "chance": {key: chance_r10},
        **_contract_method(trained),
        "baseline": _contract_method(results[UNTRAINED]) if UNTRAINED in results else None,
    }


def train_and_evaluate(settings: Settings, run_dir: Path, resume: bool = True) -> tuple[TrainResult, dict[str, Any]]:
    """Train into ``run_dir``, then evaluate its ``best.pt`` on the test split (``eval-test.json`` beside it)."""
    result = train(settings, run_dir, resume=resume)
    payload = evaluate_checkpoint(Path(run_dir) / "best.pt", split="test", progress=settings.train.progress)
    return result, payload


def render_tables(payload: dict[str, Any]) -> str:
    """The paper's Table 2 (text↔image), Table 3 (keywords) and our image→image table, as text."""
    results = payload["results"]
    image_results = dict(results)
    if "raw_voxel_i2i" in payload:
        image_results[RAW_VOXELS] = {"i2i": payload["raw_voxel_i2i"], "N": payload["N"]}
    keyword_results = dict(results)
    for method, entry in results.items():
        if "keyword_bare" in entry:  # the same model queried with the keywords as typed
            keyword_results[f"{method}, bare keywords"] = {"keyword": entry["keyword_bare"], "N": entry["N"]}
    parts = [
        format_retrieval_table(results),
        format_keyword_table(keyword_results),
        format_image_table(image_results),
    ]
    return "\n\n".join(parts)
