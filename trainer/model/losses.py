"""MedFinder's objective: L_total = L_mse + α · L_sim.

* ``L_mse`` pulls the two augmented views' embeddings together (in the released code both views are
  the same tensor, so this term is identically zero there; here the views differ).
* ``L_label`` (not in the paper, off unless ``loss.label_weight > 0``): multi-label BCE of a linear head on
  the pooled image features against the manifest's labels.
* ``L_sim`` (equation 7) is a cross-entropy over cosine scores divided by a temperature, the matching
  report being the positive. ``symmetric=True`` averages the text→image and image→text directions
  (CLIP-style); ``False`` keeps only the text→image rows, as the released code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def view_consistency_loss(embedding_1: torch.Tensor, embedding_2: torch.Tensor) -> torch.Tensor:
    """MSE between the L2-normalised embeddings of the two views (scale-free, bounded by 4)."""
    return F.mse_loss(F.normalize(embedding_1, dim=-1), F.normalize(embedding_2, dim=-1))


def contrastive_loss(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    logit_scale: torch.Tensor,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE over cosine scores; row i's positive is column i. Inputs must be L2-normalised."""
    logits = logit_scale * text_embedding @ image_embedding.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    text_to_image = F.cross_entropy(logits, targets)
    if not symmetric:
        return text_to_image
    return 0.5 * (text_to_image + F.cross_entropy(logits.t(), targets))


def label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over labels and volumes; ``targets`` are 0/1 floats ``[B, L]``."""
    return F.binary_cross_entropy_with_logits(logits, targets)
