"""COLIPRI (Microsoft Health Futures, MIT) rebuilt from a local weights folder with the ``colipri`` package's
own classes and configs, and the two graphs a bundle serves.

Weights folder (``--weights DIR``), as downloaded from the Hugging Face repos (nothing is fetched here):

* ``DIR/model.safetensors``: ``microsoft/colipri``'s checkpoint, the state dict of ``colipri.model.multimodal.Model``:
  ``image_encoder.backbone.*`` (Primus: ``down_projection.proj``, ``eva.blocks.N.*``, ``eva.norm``, ``mask_token``;
  the decoder ``up_projection`` is not used), ``image_encoder.projector.*`` (1x1x1 Conv3d 864 -> 768),
  ``image_encoder.pooler.attn.*`` (attention pooling), ``text_encoder.backbone.*`` (CXR-BERT's ``BertModel``
  without pooler), ``text_encoder.pooler.attn.*``, ``softmax_temperature``;
* ``DIR/BiomedVLP-CXR-BERT-specialized/`` (or ``--text-tower``): ``microsoft/BiomedVLP-CXR-BERT-specialized`` at
  the revision COLIPRI pins: ``config.json``, ``configuration_cxrbert.py`` + ``modeling_cxrbert.py`` (its
  ``trust_remote_code`` classes, run from this local folder only), ``vocab.txt``, ``tokenizer_config.json``,
  ``special_tokens_map.json``. Its ``pytorch_model.bin`` is needed only if the COLIPRI checkpoint lacks the text
  backbone's weights.

COLIPRI's ``get_model`` would download both (``checkpoint.download_weights``, ``AutoModel.from_pretrained`` of a hub
id); here the same Hydra config is instantiated with the text backbone pointed at the local folder, and the
checkpoint is loaded with strict key checks so a different layout fails with the keys named.
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported anywhere: they read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
TEXT_TOWER_DIR = "BiomedVLP-CXR-BERT-specialized"
TEXT_TOWER_FILES = ("config.json", "vocab.txt")
TEXT_PREFIX = "text_encoder.backbone."
#: Keys older transformers saved that newer ones do not keep (a buffer, not a weight).
IGNORABLE_KEYS = ("text_encoder.backbone.embeddings.position_ids",)
MAX_TOKENS = 512  # colipri.processor.Processor.process_text: max_length=512, truncation


class ColipriImportError(ValueError):
    """The weights folder does not hold a COLIPRI model this importer can rebuild (the message says what is off)."""


@dataclass(frozen=True)
class ColipriRecipe:
    """What COLIPRI's processor config does to an image, read from the installed ``colipri`` package."""

    input_size: int
    spacing_mm: float
    orientation: str
    padding_mode: str
    hu_window: tuple[float, float]
    output_range: tuple[float, float]


@dataclass
class ColipriModel:
    """The rebuilt ``colipri.model.multimodal.Model`` (eval, float32, CPU) and what it was built from."""

    model: nn.Module
    tokenizer: Any  # transformers tokenizer of the local CXR-BERT folder
    recipe: ColipriRecipe
    weights: Path
    text_tower: Path
    text_weights_from: str  # "checkpoint" or the CXR-BERT folder
    embedding_dim: int


def _config_overrides(input_size: int | None, orientation: str | None) -> list[str]:
    overrides = []
    if input_size is not None:
        overrides.append(f"input_size={int(input_size)}")
    if orientation is not None:
        overrides.append(f"orientation={orientation}")
    return overrides


def read_recipe(input_size: int | None = None, orientation: str | None = None) -> ColipriRecipe:
    """COLIPRI's preprocessing as its packaged processor config states it (overrides as ``get_processor``'s)."""
    from colipri.checkpoint import load_processor_config
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(load_processor_config(overrides=_config_overrides(input_size, orientation)),
                                    resolve=True)
    steps = config["image_transform"]["transforms"]
    expected = ["to_orientation", "resample", "clamp", "rescale_intensity", "crop_or_pad"]
    if list(steps) != expected:
        raise ColipriImportError(f"colipri's image transform has steps {list(steps)}; this importer knows {expected}")
    target = steps["resample"]["target"]
    clamp, rescale, crop = steps["clamp"], steps["rescale_intensity"], steps["crop_or_pad"]
    if list(rescale["in_min_max"]) != [clamp["out_min"], clamp["out_max"]]:
        raise ColipriImportError(f"colipri rescales from {rescale['in_min_max']} after clamping to "
                                 f"[{clamp['out_min']}, {clamp['out_max']}]: not a plain window")
    shape = [int(n) for n in crop["target_shape"]]
    if len(set(shape)) != 1 or not isinstance(target, (int, float)):
        raise ColipriImportError(f"colipri crops to {shape} at spacing {target}: expected a cube and one spacing")
    if shape[0] % 8:
        raise ColipriImportError(f"input size {shape[0]} is not a multiple of Primus's 8-voxel patches")
    return ColipriRecipe(input_size=shape[0], spacing_mm=float(target), orientation=str(steps["to_orientation"][
        "orientation"]), padding_mode=str(crop["padding_mode"]), hu_window=(float(clamp["out_min"]),
        float(clamp["out_max"])), output_range=tuple(float(v) for v in rescale["out_min_max"]))


def _check_folder(weights: Path, text_tower: Path) -> None:
    if not (weights / WEIGHTS_FILE).is_file():
        raise ColipriImportError(f"{weights / WEIGHTS_FILE} not found: download model.safetensors from the Hugging "
                                 "Face repo microsoft/colipri into the weights folder (README, Pretrained encoders)")
    missing = [name for name in TEXT_TOWER_FILES if not (text_tower / name).is_file()]
    if missing:
        raise ColipriImportError(f"{text_tower} lacks {missing}: put microsoft/BiomedVLP-CXR-BERT-specialized's "
                                 "config, tokenizer and modeling files there (README, Pretrained encoders)")


def _text_backbone_node(text_tower: Path, weights_in_checkpoint: bool) -> dict[str, Any]:
    """Hydra node for the text backbone, local only: ``from_config`` when the checkpoint has its weights."""
    local = {"trust_remote_code": True, "local_files_only": True}
    if weights_in_checkpoint:
        config = {"_target_": "transformers.AutoConfig.from_pretrained", "pretrained_model_name_or_path": str(text_tower),
                  **local}
        return {"_target_": "transformers.AutoModel.from_config", "config": config, "trust_remote_code": True}
    return {"_target_": "transformers.AutoModel.from_pretrained", "pretrained_model_name_or_path": str(text_tower),
            **local}


def load_colipri(weights: Path, text_tower: Path | None = None, input_size: int | None = None,
                 orientation: str | None = None) -> ColipriModel:
    """Rebuild COLIPRI from ``weights`` (see the module docstring) for ``input_size``³ volumes."""
    from colipri.checkpoint import load_model_config
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    weights = Path(weights).expanduser().resolve()
    text_tower = Path(text_tower).expanduser().resolve() if text_tower else weights / TEXT_TOWER_DIR
    _check_folder(weights, text_tower)
    recipe = read_recipe(input_size, orientation)
    try:
        state = load_file(str(weights / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ColipriImportError(f"{weights / WEIGHTS_FILE}: not a readable safetensors file ({error})") from None
    text_in_checkpoint = any(key.startswith(TEXT_PREFIX) for key in state)

    config = load_model_config(overrides=_config_overrides(recipe.input_size, recipe.orientation))
    config.text_encoder.backbone = OmegaConf.create(_text_backbone_node(text_tower, text_in_checkpoint))
    try:
        model = instantiate(config)
    except Exception as error:  # hydra wraps whatever transformers / the remote code raised
        raise ColipriImportError(f"cannot build COLIPRI from its config with the text tower {text_tower}: "
                                 f"{error}") from error
    for key in IGNORABLE_KEYS:
        state.pop(key, None)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if text_in_checkpoint or not k.startswith(TEXT_PREFIX)]
    if missing or result.unexpected_keys:
        raise ColipriImportError(
            f"{weights / WEIGHTS_FILE} does not fit COLIPRI's architecture: {len(missing)} missing keys "
            f"{missing[:5]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}")
    model = model.float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(text_tower), local_files_only=True, trust_remote_code=True)
    dim = int(model.image_encoder.projector.out_channels)
    logger.info("COLIPRI rebuilt: input %d^3, %d-d, text weights from %s", recipe.input_size, dim,
                "the checkpoint" if text_in_checkpoint else text_tower)
    return ColipriModel(model=model, tokenizer=tokenizer, recipe=recipe, weights=weights / WEIGHTS_FILE,
                        text_tower=text_tower, text_weights_from="checkpoint" if text_in_checkpoint else str(text_tower),
                        embedding_dim=dim)


class ColipriImageGraph(nn.Module):
    """``Model.encode_image(volume, pool=True, project=True, normalize=True)``: [B, 1, N, N, N] -> [B, E] unit rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(volume, pool=True, project=True, normalize=True)


class ColipriTextGraph(nn.Module):
    """``Model.encode_text(ids, mask)`` (attention pooling, L2 norm) without the pooler's data-dependent input
    check (``torch.export`` cannot trace a Python ``if`` on tensor values; the runtime never sends an all-padding
    row: every tokenised text has ``[CLS]`` and ``[SEP]``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.text_encoder.backbone
        self.attn = model.text_encoder.pooler.attn

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask=attention_mask)["last_hidden_state"]
        valid = attention_mask.to(hidden.dtype).unsqueeze(-1)
        query = ((hidden * valid).sum(dim=1) / valid.sum(dim=1)).unsqueeze(1)  # masked mean, as AttentionPool1D
        pooled, _ = self.attn(query, hidden, hidden, key_padding_mask=attention_mask == 0)
        return torch.nn.functional.normalize(pooled.squeeze(1), dim=1)
