"""Cross-attention fusion of two augmented views (the paper's equations 5-6), read at token level.

The paper writes ``F = Z1 ⊙ softmax(Z1ᵀ Z2 / (√D ‖Z1‖ ‖Z2‖))``. For a batch of pooled N×D vectors
``Z1ᵀZ2`` is D×D, and the released code's B×B variant is only shape-valid at B = 1 (a no-op) or
B = 512 (an accidental broadcast). We therefore apply it where it is well defined and non-degenerate:
over the encoder's spatial tokens of ONE volume, before pooling.

For tokens ``Z1, Z2 ∈ R^{N×C}`` of views 1 and 2 of the same volume::

    A = softmax_j( ⟨z1_i, z2_j⟩ / √C )        (N×N: each view-1 token attends over view-2 tokens)
    F = Z1 ⊙ (A Z2)                            (gate view-1 tokens by what they find in view 2)
    f = mean_i F_i                             (mean pooling; then the projection head)

At inference there is a single (un-augmented) view, and the same operator runs with ``Z1 = Z2 = Z``,
so training and serving share one code path. With fusion switched off, ``f = mean_i z_i``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TokenCrossAttentionFusion(nn.Module):
    """Parameter-free token cross-attention between two views, followed by mean pooling."""

    def forward(self, tokens_1: torch.Tensor, tokens_2: torch.Tensor) -> torch.Tensor:
        """``[B, N, C] x [B, N, C] -> [B, C]``."""
        scale = 1.0 / math.sqrt(tokens_1.shape[-1])
        attention = torch.softmax(torch.bmm(tokens_1, tokens_2.transpose(1, 2)) * scale, dim=-1)
        fused = tokens_1 * torch.bmm(attention, tokens_2)
        return fused.mean(dim=1)


class MeanPool(nn.Module):
    """The fusion-off branch: plain mean pooling of view 1 (view 2 is ignored)."""

    def forward(self, tokens_1: torch.Tensor, tokens_2: torch.Tensor) -> torch.Tensor:
        return tokens_1.mean(dim=1)
