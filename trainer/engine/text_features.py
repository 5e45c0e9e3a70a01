"""Frozen text features, computed once per distinct text.

The text tower is frozen, so a text's features never change during training: caching them by text
makes every epoch after the first nearly free for reports shorter than the sampler window, and
still saves most work for sampled windows of longer reports.
"""

from __future__ import annotations

import torch
from torch import nn


class TextFeatureCache:
    """``features(texts) -> [B, T]`` on the CPU, encoding only texts not seen before."""

    def __init__(self, encoder: nn.Module, batch_size: int = 64, max_entries: int = 500_000) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self.max_entries = max_entries
        self._cache: dict[str, torch.Tensor] = {}

    def features(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            encoded = self.encoder.encode(missing, batch_size=self.batch_size).float().cpu()
            if len(self._cache) + len(missing) > self.max_entries:
                self._cache.clear()  # a bounded cache; one batch always fits (max_entries >> batch size)
            self._cache.update(zip(missing, encoded))
        return torch.stack([self._cache[t] for t in texts])

    def __len__(self) -> int:
        return len(self._cache)
