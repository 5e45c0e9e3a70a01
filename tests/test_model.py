"""MedFinder's parts: both backbones, the fusion, the losses, and every switchable branch."""

from __future__ import annotations

import pytest
import torch

from config.settings import ImageEncoderSettings, LossSettings, ModelSettings
from trainer.model.fusion import MeanPool, TokenCrossAttentionFusion
from trainer.model.image_encoders import build_image_encoder
from trainer.model.losses import contrastive_loss, view_consistency_loss
from trainer.model.medfinder import MedFinder

INPUT = (16, 32, 32)
SMALL_RESNET = ImageEncoderSettings(backbone="resnet10", widths=(4, 8, 8, 16), conv1_kernel=3, conv1_stride=2)
SMALL_VIT = ImageEncoderSettings(backbone="vit_small", vit_patch_size=8)


def volumes(batch: int = 4) -> torch.Tensor:
    return torch.rand(batch, 1, *INPUT, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("settings", [SMALL_RESNET, SMALL_VIT], ids=["resnet", "vit"])
def test_backbones_return_tokens(settings: ImageEncoderSettings) -> None:
    encoder = build_image_encoder(settings, INPUT)
    tokens = encoder(volumes())
    assert tokens.ndim == 3 and tokens.shape[0] == 4 and tokens.shape[2] == encoder.feature_dim
    if settings.backbone.startswith("vit"):
        assert tokens.shape[1] == (16 // 8) * (32 // 8) * (32 // 8)  # one token per patch, no tuple leak


def test_paper_backbones_build_with_paper_sizes() -> None:
    resnet50 = build_image_encoder(ImageEncoderSettings(backbone="resnet50"), (96, 224, 224))
    assert resnet50.feature_dim == 2048
    assert 45e6 < sum(p.numel() for p in resnet50.parameters()) < 48e6
    vit = build_image_encoder(ImageEncoderSettings(backbone="vit_base"), (96, 224, 224))
    assert vit.feature_dim == 768


def test_vit_refuses_indivisible_input() -> None:
    with pytest.raises(ValueError, match="divisible"):
        build_image_encoder(SMALL_VIT, (15, 32, 32))


def test_fusion_is_token_level_and_not_degenerate() -> None:
    generator = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(3, 10, 8, generator=generator), torch.randn(3, 10, 8, generator=generator)
    fused = TokenCrossAttentionFusion()(z1, z2)
    assert fused.shape == (3, 8)
    # Hand computation for item 0.
    attention = torch.softmax(z1[0] @ z2[0].T / 8**0.5, dim=-1)
    assert torch.allclose(fused[0], (z1[0] * (attention @ z2[0])).mean(0), atol=1e-6)
    # It depends on the second view and differs from mean pooling (unlike the pooled-vector reading).
    assert not torch.allclose(fused, TokenCrossAttentionFusion()(z1, z1))
    assert not torch.allclose(fused, MeanPool()(z1, z2))
    # Batch items do not mix: changing item 2 leaves item 0 alone.
    z2_changed = z2.clone()
    z2_changed[2] += 5
    assert torch.allclose(fused[0], TokenCrossAttentionFusion()(z1, z2_changed)[0])


def test_contrastive_loss_directions() -> None:
    eye = torch.eye(4)
    perfect = contrastive_loss(eye, eye, torch.tensor(1 / 0.07))
    shuffled = contrastive_loss(eye, eye[[1, 0, 3, 2]], torch.tensor(1 / 0.07))
    assert perfect < 1e-3 < shuffled
    image, text = torch.nn.functional.normalize(torch.randn(5, 6), dim=-1), torch.nn.functional.normalize(torch.randn(5, 6), dim=-1)
    one_way = contrastive_loss(image, text, torch.tensor(10.0), symmetric=False)
    other_way = contrastive_loss(text, image, torch.tensor(10.0), symmetric=False)
    both = contrastive_loss(image, text, torch.tensor(10.0), symmetric=True)
    assert torch.isclose(both, 0.5 * (one_way + other_way))


def test_view_consistency_loss_is_scale_free() -> None:
    a = torch.randn(3, 4)
    assert view_consistency_loss(a, 5 * a) < 1e-6
    assert view_consistency_loss(a, -a) > 0.5


def build(fusion: bool = True, mse: bool = True, learnable: bool = False) -> MedFinder:
    model_settings = ModelSettings(image=SMALL_RESNET, embedding_dim=16, fusion=fusion)
    return MedFinder(model_settings, LossSettings(mse=mse, learnable_temperature=learnable), INPUT, text_feature_dim=12)


@pytest.mark.parametrize(
    "fusion,mse,two_views",
    [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, False)],
)
def test_every_branch_trains(fusion: bool, mse: bool, two_views: bool) -> None:
    torch.manual_seed(0)
    model = build(fusion=fusion, mse=mse)
    x = volumes()
    losses = model.training_losses(x, x + 0.01 if two_views else None, torch.randn(4, 12))
    assert ("mse" in losses) == (mse and two_views)
    losses["total"].backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_embeddings_are_unit_vectors_and_deterministic() -> None:
    model = build().eval()
    x = volumes()
    first, second = model.embed_image(x), model.embed_image(x)
    assert first.shape == (4, 16)
    assert torch.allclose(first.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.equal(first, second)
    text = model.embed_text_features(torch.randn(3, 12))
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_temperature_fixed_or_learnable() -> None:
    assert "log_logit_scale" not in dict(build().named_parameters())
    assert "log_logit_scale" in dict(build(learnable=True).named_parameters())


def test_trainable_state_round_trip() -> None:
    first, second = build(), build()
    second.load_trainable_state_dict(first.trainable_state_dict())
    x = volumes()
    assert torch.equal(first.eval().embed_image(x), second.eval().embed_image(x))
    with pytest.raises(ValueError, match="does not match"):
        second.load_trainable_state_dict({"nonsense": torch.zeros(1)})
