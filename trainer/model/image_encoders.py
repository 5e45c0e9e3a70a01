"""The 3D visual encoder F_3D: MONAI ResNets and ViTs that return spatial tokens, not one pooled vector.

MedFinder's cross-attention fusion (equations 5-6) needs token-level features, so every backbone here
returns ``[B, N, C]``: the last ResNet feature map flattened over (d, h, w), or the ViT's patch tokens.
Pooling happens in :mod:`trainer.model.medfinder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import ResNet, ViT
from torch import nn

from config.settings import ImageEncoderSettings


@dataclass(frozen=True)
class ResNetLayout:
    """Block type and depth per stage."""

    block: str
    layers: tuple[int, int, int, int]


RESNET_LAYOUTS: dict[str, ResNetLayout] = {
    "resnet10": ResNetLayout("basic", (1, 1, 1, 1)),
    "resnet18": ResNetLayout("basic", (2, 2, 2, 2)),
    "resnet34": ResNetLayout("basic", (3, 4, 6, 3)),
    "resnet50": ResNetLayout("bottleneck", (3, 4, 6, 3)),  # the paper's backbone
}

VIT_SIZES: dict[str, dict[str, int]] = {
    "vit_base": {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},  # the paper's ViT
    "vit_small": {"hidden_size": 384, "mlp_dim": 1536, "num_layers": 6, "num_heads": 6},  # CPU-sized
}


class ImageEncoder(nn.Module):
    """Common surface: ``forward(x [B,1,D,H,W]) -> tokens [B, N, C]`` and ``feature_dim`` = C."""

    feature_dim: int


class ResNetTokens(ImageEncoder):
    """A MONAI 3D ResNet without its pooling and classifier; the last feature map becomes the tokens."""

    def __init__(self, layout: ResNetLayout, settings: ImageEncoderSettings) -> None:
        super().__init__()
        widths = settings.widths or (64, 128, 256, 512)
        self.net = ResNet(
            block=layout.block,
            layers=list(layout.layers),
            block_inplanes=list(widths),
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=settings.conv1_kernel,
            conv1_t_stride=settings.conv1_stride,
            no_max_pool=not settings.max_pool,
            feed_forward=False,
        )
        expansion = 4 if layout.block == "bottleneck" else 1
        self.feature_dim = widths[-1] * expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return x.flatten(2).transpose(1, 2)  # [B, C, d, h, w] -> [B, d*h*w, C]


class ViTTokens(ImageEncoder):
    """A MONAI 3D ViT; its forward returns ``(tokens, hidden_states)`` and we keep the normed tokens."""

    def __init__(self, size: dict[str, int], input_shape: tuple[int, int, int], patch_size: int) -> None:
        super().__init__()
        for dim in input_shape:
            if dim % patch_size:
                raise ValueError(f"ViT input {input_shape} is not divisible by patch size {patch_size}")
        self.net = ViT(
            in_channels=1,
            img_size=input_shape,
            patch_size=patch_size,
            classification=False,
            spatial_dims=3,
            **size,
        )
        self.feature_dim = size["hidden_size"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _hidden_states = self.net(x)
        return tokens


def build_image_encoder(settings: ImageEncoderSettings, input_shape: tuple[int, int, int]) -> ImageEncoder:
    """The configured backbone for inputs of ``input_shape`` (D, H, W), optionally with local weights."""
    if settings.backbone in RESNET_LAYOUTS:
        encoder: ImageEncoder = ResNetTokens(RESNET_LAYOUTS[settings.backbone], settings)
    else:
        encoder = ViTTokens(VIT_SIZES[settings.backbone], input_shape, settings.vit_patch_size)
    if settings.weights is not None:
        load_backbone_weights(encoder, settings.weights)
    return encoder


def load_backbone_weights(encoder: ImageEncoder, path: Path) -> None:
    """Load a local state dict into the backbone; a missing file or mismatched keys is a clear error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image encoder weights {path} do not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = encoder.net.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"image encoder weights {path} lack {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"image encoder weights {path} have {len(unexpected)} unknown tensors, e.g. {unexpected[:3]}")
