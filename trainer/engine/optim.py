"""Optimiser and learning-rate schedule from :class:`~config.settings.OptimSettings`.

The schedule is stepped per optimiser step (not per epoch): linear warm-up over ``warmup_epochs``,
then cosine annealing to zero at the end of training, or a constant rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from config.settings import OptimSettings


def build_optimizer(settings: OptimSettings, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW (the practical preset)."""
    trainable = [p for p in parameters if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: OptimSettings, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: warm-up, then cosine (or constant)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, steps_per_epoch * settings.warmup_epochs)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if settings.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
