"""Two augmented views per volume: rotation and Gaussian noise (MONAI), plus CutMix.

Rotation uses MONAI's batched ``AffineTransform`` layer with matrices from ``create_rotate``: one
resampling call per batch instead of one per volume (per-volume ``RandRotate`` cost ~40 ms each on two
CPU cores, more than the model step). Angles act in normalised grid coordinates, i.e. a small
rotation-like shear on anisotropic grids, which is all an augmentation needs.
CutMix pastes a random box from another volume of the same batch; in this contrastive setting it acts
as occlusion noise, so it is kept small (``cutmix_max_fraction`` of each side) and rare by default.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.layers import AffineTransform
from monai.transforms.utils import create_rotate

from config.settings import AugmentSettings


class ViewAugmenter:
    """Makes one augmented view of a batch ``[B, 1, D, H, W]``; call twice for two views."""

    def __init__(self, settings: AugmentSettings, seed: int) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        self.resample = AffineTransform(normalized=True, padding_mode="border")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        view = self.rotate(batch.float())
        view = self.add_noise(view)
        return self.cutmix(view)

    def _chosen(self, size: int, probability: float) -> np.ndarray:
        return np.flatnonzero(self.rng.random(size) < probability)

    def rotate(self, batch: torch.Tensor) -> torch.Tensor:
        """Rotate a random subset of the batch by up to ``rotate_range_rad`` about each axis."""
        chosen = self._chosen(batch.shape[0], self.settings.rotate_prob)
        if chosen.size == 0 or self.settings.rotate_range_rad == 0:
            return batch
        limit = self.settings.rotate_range_rad
        matrices = [
            create_rotate(3, tuple(self.rng.uniform(-limit, limit, size=3)))[:3] for _ in chosen
        ]
        theta = torch.as_tensor(np.stack(matrices), dtype=batch.dtype)
        out = batch.clone()
        index = torch.as_tensor(chosen)
        out[index] = self.resample(batch[index], theta)
        return out

    def add_noise(self, batch: torch.Tensor) -> torch.Tensor:
        """Additive Gaussian noise (std ``noise_std`` in output units) on a random subset."""
        chosen = self._chosen(batch.shape[0], self.settings.noise_prob)
        if chosen.size == 0 or self.settings.noise_std == 0:
            return batch
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**62)))
        index = torch.as_tensor(chosen)
        out = batch.clone()
        noise = torch.randn(out[index].shape, generator=generator, dtype=batch.dtype)
        out[index] = out[index] + self.settings.noise_std * noise
        return out

    def cutmix(self, batch: torch.Tensor) -> torch.Tensor:
        """Paste a box from a partner volume into each selected volume (needs a batch of two or more)."""
        size = batch.shape[0]
        if size < 2 or self.settings.cutmix_prob == 0:
            return batch
        mixed = batch.clone()
        for index in self._chosen(size, self.settings.cutmix_prob):
            partner = (int(index) + int(self.rng.integers(1, size))) % size
            box = []
            for extent in batch.shape[2:]:
                length = max(1, int(extent * self.rng.uniform(0.1, self.settings.cutmix_max_fraction)))
                start = int(self.rng.integers(0, extent - length + 1))
                box.append(slice(start, start + length))
            mixed[(int(index), slice(None), *box)] = batch[(partner, slice(None), *box)]
        return mixed
