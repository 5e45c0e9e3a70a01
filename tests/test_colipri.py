"""``medfinder import colipri``: COLIPRI's real architecture from a local weights folder -> a served bundle.

No COLIPRI weights can be downloaded here (the Hugging Face repo microsoft/colipri is not reachable), so the test
writes a weights folder of the real layout with random weights: ``model.safetensors`` holding the state dict of
``colipri.model.multimodal.Model`` (Primus-M image tower exactly as COLIPRI's config builds it, 1x1x1 projection,
attention poolers) at a small input size (64³, so CPU is fast; Primus has no absolute position embedding, so the
weights do not depend on it), and a CXR-BERT folder: CXR-BERT's configuration (12 layers, 768-d, 512 positions)
with its ``trust_remote_code`` classes (``CXRBertConfig``/``CXRBertModel`` as the Hub repo defines them, reduced to
the parts loading uses) and a small vocabulary written here. Then: import -> ``bundle verify`` -> parity (recorded
by the import, against colipri's own PyTorch model and torchio transform) -> a node serving the bundle receives
the two lung studies, indexes them and sends an SR per study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from node_helpers import storescp, write_node_config
from test_node_e2e import check_two_study_round_trip

from config.settings import PreprocessingSettings
from model_export.bundle_manifest import read_manifest
from model_export.errors import BundleMismatchError
from model_export.preprocessing import (
    center_crop_or_pad,
    describe_spec,
    load_volume,
    preprocess_volume,
)
from model_export.registry import install_bundle
from model_export.runtime import ModelBundle

REPO = Path(__file__).resolve().parent.parent
MEDFINDER = Path(sys.executable).parent / "medfinder"
INPUT_SIZE = 64

CONFIGURATION_CXRBERT = '''from transformers import BertConfig


class CXRBertConfig(BertConfig):
    model_type = "cxr-bert"

    def __init__(self, projection_size: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.projection_size = projection_size
'''
MODELING_CXRBERT = '''from torch import nn
from transformers import BertForMaskedLM

from .configuration_cxrbert import CXRBertConfig


class BertProjectionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_to_hidden = nn.Linear(config.hidden_size, config.projection_size)
        self.transform_act_fn = nn.functional.gelu
        self.LayerNorm = nn.LayerNorm(config.projection_size, eps=1e-12)
        self.dense_to_output = nn.Linear(config.projection_size, config.projection_size)


class CXRBertModel(BertForMaskedLM):
    config_class = CXRBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.cls_projection_head = BertProjectionHead(config)
        self.post_init()
'''
WORDS = ("the", "lung", "lungs", "nodule", "small", "right", "left", "upper", "lower", "lobe", "no", "pleural",
         "effusion", "mild", "emphysema", "heart", "size", "normal", "and", "in", "both", "of", "is", "there", "mm",
         "consolidation", "atelectasis", "base", "present", "seen", "or", "pneumothorax", ".", ",", ";", ":", "&", "-")


def write_colipri_folder(folder: Path, input_size: int, seed: int = 0) -> Path:
    """A COLIPRI weights folder (real layout, random weights; see the module docstring)."""
    import torch
    from colipri.pooling import AttentionPool1D
    from dynamic_network_architectures.architectures.primus import Primus
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    text = folder / "BiomedVLP-CXR-BERT-specialized"
    text.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *"0123456789", *(f"##{c}" for c in letters)]
    (text / "vocab.txt").write_text("\n".join(vocab) + "\n")
    bert = {"vocab_size": len(vocab), "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "pad_token_id": 0}
    config = {"architectures": ["CXRBertModel"], "model_type": "cxr-bert", "projection_size": 128, **bert,
              "auto_map": {"AutoConfig": "configuration_cxrbert.CXRBertConfig",
                           "AutoModel": "modeling_cxrbert.CXRBertModel"}}
    (text / "config.json").write_text(json.dumps(config, indent=2))
    (text / "configuration_cxrbert.py").write_text(CONFIGURATION_CXRBERT)
    (text / "modeling_cxrbert.py").write_text(MODELING_CXRBERT)
    (text / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512,
                                                            "tokenizer_class": "BertTokenizer"}))
    (text / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]", "sep_token": "[SEP]",
                                                              "pad_token": "[PAD]", "cls_token": "[CLS]",
                                                              "mask_token": "[MASK]"}))
    primus = Primus(input_channels=1, num_classes=1, eva_depth=16, eva_numheads=12, embed_dim=864,
                    patch_embed_size=(8, 8, 8), input_shape=(input_size,) * 3, use_rot_pos_emb=True,
                    use_abs_pos_embed=False, drop_path_rate=0.2, init_values=0.1, scale_attn_inner=True,
                    num_register_tokens=0)
    state = {f"image_encoder.backbone.{k}": v for k, v in primus.state_dict().items()
             if not k.startswith("up_projection.")}  # COLIPRI replaces the decoder with Identity
    parts = {"image_encoder.projector.": torch.nn.Conv3d(864, 768, 1),
             "image_encoder.pooler.": AttentionPool1D(768, 12),
             "text_encoder.backbone.": BertModel(BertConfig(**bert), add_pooling_layer=False),
             "text_encoder.pooler.": AttentionPool1D(768, 12)}
    for prefix, module in parts.items():
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    state["softmax_temperature"] = torch.tensor(1.0)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def run_medfinder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(MEDFINDER), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def colipri_bundle(tmp_path_factory: pytest.TempPathFactory, lung_ct_dir: Path) -> Path:
    """The imported bundle (``medfinder import colipri``, the parity check on a real lung series included)."""
    root = tmp_path_factory.mktemp("colipri")
    weights = write_colipri_folder(root / "weights", INPUT_SIZE)
    series = min(p for p in lung_ct_dir.glob("Lung_Dx-*") if p.is_dir())
    out = root / "bundle"
    result = run_medfinder("import", "colipri", "--weights", str(weights), "--out", str(out), "--input-size",
                           str(INPUT_SIZE), "--parity-series", str(series), "--threads", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (weights / "model.safetensors").unlink()  # ~0.9 GB; the bundle holds what the tests need
    return out


def test_import_verifies_with_colipri_recipe_and_parity(colipri_bundle: Path) -> None:
    verify = run_medfinder("bundle", "verify", str(colipri_bundle), timeout=120)
    assert verify.returncode == 0, verify.stderr
    manifest = read_manifest(colipri_bundle)
    assert manifest.embedding_dim == 768
    assert manifest.domain is not None and manifest.domain.body_regions == ["CHEST"]
    recipe = manifest.preprocessing
    assert (recipe["recipe_version"], recipe["fit"], recipe["axis_order"]) == ("2", "crop_or_pad", "RAS")
    assert recipe["target_shape"] == [INPUT_SIZE] * 3 and recipe["target_spacing_mm"] == [2.0, 2.0, 2.0]
    assert (recipe["hu_window"], recipe["output_range"], recipe["pad_value"]) == ([-1000.0, 1000.0], [-1.0, 1.0], -1.0)
    assert recipe["crop_foreground"] is False
    parity = manifest.parity
    assert parity["passed"] and parity["min_cosine"] >= 0.9999
    assert parity["image_encoder"]["cases"]["real_series"]["min_cosine"] >= 0.9999
    assert parity["text_encoder"]["cases"]["reports"]["n"] == 4
    assert parity["preprocessing_vs_torchio"]["max_abs_diff_vs_torchio"] < 1e-5
    assert manifest.text["sampler_enabled"] is False and manifest.text_encoder.max_tokens == 512


def test_node_serves_the_colipri_bundle(tmp_path: Path, lung_ct_dir: Path, colipri_bundle: Path) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(colipri_bundle, data_dir, activate=True)
    pacs_dir = tmp_path / "pacs"
    with storescp(pacs_dir) as pacs_port:
        config = write_node_config(tmp_path / "node.yaml", data_dir, pacs_port)
        check_two_study_round_trip(tmp_path, lung_ct_dir, config, pacs_dir)


def test_crop_or_pad_recipe_matches_torchio(lung_ct_dir: Path) -> None:
    """Our numpy recipe against COLIPRI's torchio transforms (real lung series; crops in-plane, pads along z)."""
    import torch
    import torchio as tio

    volume = load_volume(min(p for p in lung_ct_dir.glob("Lung_Dx-*") if p.is_dir()))
    for orientation, size in (("RAS", 96), ("SAR", 160)):
        spec = PreprocessingSettings(hu_window=(-1000, 1000), output_range=(-1, 1), target_shape=(size,) * 3,
                                     target_spacing_mm=(2, 2, 2), crop_foreground=False, fit="crop_or_pad",
                                     pad_value=-1.0, axis_order=orientation)
        ours = preprocess_volume(volume, spec)
        image = tio.ScalarImage(tensor=torch.from_numpy(volume.array[np.newaxis].copy()), affine=volume.affine)
        transform = tio.Compose([tio.ToOrientation(orientation), tio.Resample(2), tio.Clamp(-1000, 1000),
                                 tio.RescaleIntensity(out_min_max=(-1, 1), in_min_max=(-1000, 1000)),
                                 tio.CropOrPad((size,) * 3, padding_mode="minimum")])
        reference = transform(image).data.numpy()
        assert ours.shape == reference.shape == (1, size, size, size)
        assert float(np.abs(ours - reference).max()) < 1e-5, orientation


def test_center_crop_or_pad_puts_the_odd_voxel_first() -> None:
    array = np.arange(5, dtype=np.float32).reshape(5, 1, 1)
    assert center_crop_or_pad(array, (2, 1, 1), 0).ravel().tolist() == [2.0, 3.0]  # ceil(3/2)=2 cut at the start
    assert center_crop_or_pad(array, (8, 2, 1), -1).shape == (8, 2, 1)
    assert center_crop_or_pad(array, (8, 1, 1), -1).ravel().tolist() == [-1, -1, 0, 1, 2, 3, 4, -1]


def test_medfinder_defaults_stay_recipe_version_1() -> None:
    description = describe_spec(PreprocessingSettings())
    assert description["recipe_version"] == "1"
    assert not {"fit", "pad_value", "axis_order"} & set(description)
    assert ModelBundle._preprocessing_spec(description) == PreprocessingSettings()


def test_runtime_refuses_recipes_it_cannot_follow() -> None:
    spec = PreprocessingSettings(fit="crop_or_pad", axis_order="RAS", target_shape=(64, 64, 64), pad_value=-1.0,
                                 target_spacing_mm=(2.0, 2.0, 2.0))
    description = describe_spec(spec)
    assert ModelBundle._preprocessing_spec(description) == spec
    cases = {"an unknown recipe": {**description, "recipe": "torchio-compose"},
             "an unknown step": {**description, "clahe": True},
             "version 1 with fit": {**description, "recipe_version": "1"},
             "a future version": {**description, "recipe_version": "3"}}
    for what, broken in cases.items():
        with pytest.raises(BundleMismatchError):
            ModelBundle._preprocessing_spec(broken)
            pytest.fail(what)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    result = run_medfinder("import", "colipri", "--weights", str(tmp_path), "--out", str(tmp_path / "b"),
                           "--input-size", "64", timeout=120)
    assert result.returncode == 1
    assert "model.safetensors" in result.stderr and "microsoft/colipri" in result.stderr
