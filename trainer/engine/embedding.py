"""Embedding whole galleries with a trained model: the shared path of validation and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from config.settings import TextSamplerSettings
from model_export.text_windows import inference_chunks
from trainer.engine.text_features import TextFeatureCache
from trainer.model.medfinder import MedFinder


@torch.no_grad()
def embed_volume_arrays(
    model: MedFinder, arrays: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """``[N, 1, D, H, W]`` preprocessed arrays -> ``[N, E]`` unit vectors (float32)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(arrays), batch_size):
        batch = torch.as_tensor(arrays[start : start + batch_size]).float().to(device)
        out.append(model.embed_image(batch).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, model.image_head_out_dim()), dtype=np.float32)
    return torch.cat(out).numpy()


@torch.no_grad()
def embed_reports(
    model: MedFinder,
    cache: TextFeatureCache,
    reports: list[str],
    sampler: TextSamplerSettings,
    device: torch.device,
) -> np.ndarray:
    """Each report -> its chunks' embeddings mean-pooled and re-normalised -> ``[N, E]``."""
    was_training = model.training
    model.eval()
    chunk_lists = [inference_chunks(r, sampler.window_words, sampler.max_chunks, sampler.enabled) for r in reports]
    flat = [chunk for chunks in chunk_lists for chunk in chunks]
    projected = model.embed_text_features(cache.features(flat).to(device)).float().cpu()
    pooled, offset = [], 0
    for chunks in chunk_lists:
        pooled.append(projected[offset : offset + len(chunks)].mean(dim=0))
        offset += len(chunks)
    model.train(was_training)
    return torch.nn.functional.normalize(torch.stack(pooled), dim=-1).numpy()
