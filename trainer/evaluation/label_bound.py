"""``medfinder label-bound``: how well can this image tower learn the labels at all, with direct supervision?

Why: when contrastive training misses a finding, the question is whether the report signal is too weak or
whether the image tower cannot pick the finding up in the budget at all. This trains the configured image
tower alone with a linear head and multi-label BCE on the manifest's labels — same data, preprocessing,
augmentation and optimiser settings as ``medfinder train``, no text tower — and reports, per label, the
ROC AUC on the training and held-out splits and P@K of the head's scores on the held-out gallery (the
same P@K as keyword retrieval). A supervised tower is an upper reference for the keyword P@K a
contrastive run of the same length can reach; a train AUC far above the held-out one means memorisation.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn
from tqdm import tqdm

from config import Settings
from trainer.data.augment import ViewAugmenter
from trainer.data.manifest import label_matrix
from trainer.data.row_checks import RowPolicy
from trainer.data.sources import load_splits
from trainer.data.volumes import VolumeSet
from trainer.engine.optim import build_optimizer, build_scheduler
from trainer.evaluation.metrics import precision_at_k
from trainer.model.image_encoders import build_image_encoder
from trainer.model.losses import label_loss
from trainer.model.medfinder import VOLUME_LAYOUT

logger = logging.getLogger(__name__)


class LabelClassifier(nn.Module):
    """The configured image tower, mean-pooled over its tokens, and one linear logit per label."""

    def __init__(self, settings: Settings, n_labels: int) -> None:
        super().__init__()
        self.encoder = build_image_encoder(settings.model.image, settings.preprocessing.target_shape)
        self.encoder.to(memory_format=VOLUME_LAYOUT)
        self.head = nn.Linear(self.encoder.feature_dim, n_labels)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volumes.contiguous(memory_format=VOLUME_LAYOUT)).mean(dim=1))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic (ties count one half); NaN without both classes."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # 1-based, ties share their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@torch.no_grad()
def predict(model: LabelClassifier, volumes: VolumeSet, batch_size: int) -> np.ndarray:
    model.eval()
    chunks = [model(torch.as_tensor(volumes.arrays[i : i + batch_size]).float()) for i in range(0, len(volumes), batch_size)]
    return torch.cat(chunks).numpy()


def score_labels(logits: np.ndarray, targets: np.ndarray, names: tuple[str, ...], ks: tuple[int, ...]) -> dict[str, Any]:
    """Per label: AUC, P@K of the scores, prevalence; plus their means over labels."""
    per_label: dict[str, Any] = {}
    for column, name in enumerate(names):
        precision = precision_at_k(logits[:, column], targets[:, column] > 0, ks)
        per_label[name] = {"AUC": roc_auc(logits[:, column], targets[:, column]),
                           **{f"P@{k}": precision[f"P@{k}"] for k in ks},
                           "prevalence": float(targets[:, column].mean())}
    keys = ["AUC", *(f"P@{k}" for k in ks)]
    per_label["mean"] = {key: float(np.nanmean([per_label[n][key] for n in names])) for key in keys}
    return per_label


def run_label_bound(settings: Settings, out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train the supervised reference for ``settings.train.epochs`` epochs; returns (and writes) the figures."""
    torch.manual_seed(settings.train.seed)
    if settings.train.num_threads:
        torch.set_num_threads(settings.train.num_threads)
    names = tuple(settings.loss.label_names)
    splits = load_splits(settings, RowPolicy(settings.data.on_bad_row), progress=progress, include_test=True)
    held_out = splits.test if splits.test is not None and len(splits.test) else splits.val
    train_targets = label_matrix(splits.train.rows, names)
    model = LabelClassifier(settings, len(names))
    batch = max(2, settings.train.batch_size)
    steps_per_epoch = max(1, len(splits.train) // batch)
    optimizer = build_optimizer(settings.optim, model.parameters())
    scheduler = build_scheduler(optimizer, settings.optim, steps_per_epoch, settings.train.epochs)
    augmenter = ViewAugmenter(settings.augment, seed=settings.train.seed)
    started = time.time()
    for epoch in range(settings.train.epochs):
        model.train()
        order = np.random.default_rng([settings.train.seed, epoch]).permutation(len(splits.train))
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"label-bound epoch {epoch + 1}", disable=not progress, leave=False):
            indices = np.sort(order[step * batch : (step + 1) * batch])
            volumes = augmenter(torch.as_tensor(splits.train.arrays[indices]).float())
            loss = label_loss(model(volumes), torch.as_tensor(train_targets[indices]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        logger.info("label-bound epoch %d: loss %.4f (%.0f s)", epoch + 1, float(np.mean(losses)), time.time() - started)
    ks = tuple(settings.eval.precision_ks)
    result = {
        "labels": list(names),
        "epochs": settings.train.epochs,
        "minutes": round((time.time() - started) / 60, 2),
        "train": {"N": len(splits.train), **score_labels(predict(model, splits.train, settings.eval.batch_size), train_targets, names, ks)},
        "held_out": {"N": len(held_out), **score_labels(predict(model, held_out, settings.eval.batch_size),
                                                      label_matrix(held_out.rows, names, for_training=False), names, ks)},
    }
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def format_label_bound(result: dict[str, Any]) -> str:
    """One line per label: train AUC, held-out AUC and P@K."""
    held = result["held_out"]
    ks = [key for key in held["mean"] if key.startswith("P@")]
    lines = [f"Supervised label reference: {result['epochs']} epochs in {result['minutes']} min; held-out N = {held['N']}",
             f"{'label':18} {'train AUC':>9} {'AUC':>6} " + " ".join(f"{k:>6}" for k in ks)]
    for name in [*result["labels"], "mean"]:
        lines.append(f"{name:18} {result['train'][name]['AUC']:9.3f} {held[name]['AUC']:6.3f} "
                     + " ".join(f"{held[name][k]:6.2f}" for k in ks))
    return "\n".join(lines)
