"""MedFinder: a trainable 3D image tower and a frozen text tower meeting in one L2-normalised space.

``embed_image`` is the inference path (one view, fusion of the view with itself), ``embed_text_features``
projects frozen text features, and ``training_losses`` runs the two-view objective of the paper (plus,
optionally, an auxiliary label loss that is not in the paper).
The frozen text encoder is attached but never saved in checkpoints: it is rebuilt from settings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from config.settings import LossSettings, ModelSettings
from trainer.model.fusion import MeanPool, TokenCrossAttentionFusion
from trainer.model.image_encoders import build_image_encoder
from trainer.model.losses import contrastive_loss, label_loss, view_consistency_loss

FROZEN_PREFIX = "text_encoder."
# Channels-last 3D layout: ~1.5x faster 3D convolutions on CPU (oneDNN) and friendlier to cuDNN.
VOLUME_LAYOUT = torch.channels_last_3d


def projection_head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    """The trainable head that maps a tower's features into the shared space."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    hidden = max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def gather_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients, so contrastive negatives span the global batch under DDP."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


class MedFinder(nn.Module):
    """Image encoder + fusion + projection heads, with a frozen text encoder beside them."""

    def __init__(
        self,
        model: ModelSettings,
        loss: LossSettings,
        input_shape: tuple[int, int, int],
        text_feature_dim: int,
        text_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = build_image_encoder(model.image, input_shape)
        self.fusion = TokenCrossAttentionFusion() if model.fusion else MeanPool()
        self.image_head = projection_head(self.image_encoder.feature_dim, model.embedding_dim, model.projection)
        self.text_head = projection_head(text_feature_dim, model.embedding_dim, model.projection)
        # Only when the auxiliary label loss is on, so checkpoints of the paper's objective keep their keys.
        self.label_head = (
            nn.Linear(self.image_encoder.feature_dim, len(loss.label_names)) if loss.label_weight > 0 else None
        )
        initial = torch.tensor(math.log(1.0 / loss.temperature))
        if loss.learnable_temperature:
            self.log_logit_scale = nn.Parameter(initial)
        else:
            self.register_buffer("log_logit_scale", initial)
        self.loss_settings = loss
        self.text_encoder = text_encoder
        self.image_encoder.to(memory_format=VOLUME_LAYOUT)

    # --- inference -------------------------------------------------------------------------------
    def embed_image(self, volumes: torch.Tensor) -> torch.Tensor:
        """``[B, 1, D, H, W]`` preprocessed volumes -> ``[B, E]`` unit vectors."""
        tokens = self.image_encoder(volumes.contiguous(memory_format=VOLUME_LAYOUT))
        return F.normalize(self.image_head(self.fusion(tokens, tokens)), dim=-1)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen text features ``[B, T]`` -> ``[B, E]`` unit vectors."""
        return F.normalize(self.text_head(features), dim=-1)

    def image_head_out_dim(self) -> int:
        """The embedding dimension E."""
        return self.text_head.out_features if isinstance(self.text_head, nn.Linear) else self.text_head[-1].out_features

    # --- training --------------------------------------------------------------------------------
    def training_losses(
        self,
        view_1: torch.Tensor,
        view_2: torch.Tensor | None,
        text_features: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """L_total = L_mse + α·L_sim (+ w·L_label) for one batch; ``view_2=None`` is the single-view ablation."""
        settings = self.loss_settings
        if view_2 is None:
            tokens_1 = tokens_2 = self.image_encoder(view_1.contiguous(memory_format=VOLUME_LAYOUT))
        elif settings.second_view_gradient:
            both = torch.cat([view_1, view_2]).contiguous(memory_format=VOLUME_LAYOUT)
            tokens_1, tokens_2 = self.image_encoder(both).chunk(2)
        else:
            tokens_1 = self.image_encoder(view_1.contiguous(memory_format=VOLUME_LAYOUT))
            with torch.no_grad():  # stop-gradient target view: a forward pass only, no backward
                tokens_2 = self.image_encoder(view_2.contiguous(memory_format=VOLUME_LAYOUT))
        image = F.normalize(self.image_head(self.fusion(tokens_1, tokens_2)), dim=-1)
        text = self.embed_text_features(text_features)
        similarity = contrastive_loss(
            gather_across_ranks(image),
            gather_across_ranks(text),
            self.log_logit_scale.exp().clamp(max=100.0),
            symmetric=settings.symmetric,
        )
        losses = {"sim": similarity}
        total = settings.alpha * similarity
        # the single-view pooled features, only when a term needs them (not on the plain contrastive path)
        needs_single_view = (settings.mse and view_2 is not None) or self.label_head is not None
        pooled_1 = self.fusion(tokens_1, tokens_1) if needs_single_view else None
        if settings.mse and view_2 is not None:
            pooled_2 = self.fusion(tokens_2, tokens_2)
            losses["mse"] = view_consistency_loss(self.image_head(pooled_1), self.image_head(pooled_2))
            total = total + losses["mse"]
        if self.label_head is not None:
            if labels is None:
                raise ValueError("loss.label_weight > 0 needs label targets for every batch")
            losses["label"] = label_loss(self.label_head(pooled_1), labels)
            total = total + settings.label_weight * losses["label"]
        losses["total"] = total
        return losses

    def forward(
        self,
        view_1: torch.Tensor,
        view_2: torch.Tensor | None,
        text_features: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training objective, so that DistributedDataParallel's hooks wrap it."""
        return self.training_losses(view_1, view_2, text_features, labels)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen text encoder (rebuilt from settings when a checkpoint loads)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIX)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state_dict`; any other mismatch is an error."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(FROZEN_PREFIX)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
