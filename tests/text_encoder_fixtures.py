"""Test helpers: a tiny BiomedCLIP-shaped open_clip folder with small random weights.

The folder has the exact layout a user prepares for the real BiomedCLIP (see
:class:`trainer.model.text_encoders.BiomedCLIPTextEncoder`):

* ``open_clip_config.json`` whose ``model_cfg.text_cfg.hf_model_name`` and ``hf_tokenizer_name`` are the folder path;
* ``open_clip_pytorch_model.bin``: the full CLIP state dict (vision + text tower);
* ``config.json``, ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``: a BERT config and tokenizer.

Everything is small (BERT hidden 32, 2 layers; a 1-layer 32-wide ViT; embed_dim 16), so the folder is built and
loaded in well under a second, and the real ``local-dir:`` loading path of open_clip is exercised end to end.
Other test modules (model export, trainer) can import :func:`build_tiny_biomedclip_folder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_EMBED_DIM = 16
TINY_CONTEXT_LENGTH = 256

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """
the a an of and or in on with without no is are was were be there this that to from at for by as
chest ct scan lung lungs left right upper lower lobe middle bilateral pleural effusion effusions nodule
nodules mass opacity opacities ground glass consolidation atelectasis emphysema fibrosis pneumothorax
heart cardiac size normal enlarged mediastinal lymph node nodes aorta trachea bronchi airway liver
kidney spleen bone bones fracture rib ribs small large mild moderate severe new stable seen noted
findings impression evidence acute chronic mm cm contrast pulmonary embolism thyroid
""".split()
_PIECES = ["##s", "##es", "##ed", "##ing", "##al", "##ly", "##ar", "##ic", "##er"]
_PUNCTUATION = list(".,;:()-/%\"'") + [str(d) for d in range(10)]


def tiny_vocab() -> list[str]:
    """The tokens of the tiny vocabulary, in id order (``[PAD]`` = 0)."""
    vocab: list[str] = []
    for token in _SPECIAL_TOKENS + _PUNCTUATION + _WORDS + _PIECES:
        if token not in vocab:
            vocab.append(token)
    return vocab


def _bert_config(vocab_size: int) -> dict:
    return {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }


def write_open_clip_config(
    folder: Path,
    *,
    hf_model_name: str | None = None,
    hf_tokenizer_name: str | None = None,
    embed_dim: int = TINY_EMBED_DIM,
) -> Path:
    """Write ``open_clip_config.json``; the HF names default to the folder itself (what a user must set)."""
    folder = Path(folder)
    config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            # open_clip's native ViT: builds offline without timm weights.
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {
                "hf_model_name": str(folder) if hf_model_name is None else hf_model_name,
                "hf_tokenizer_name": str(folder) if hf_tokenizer_name is None else hf_tokenizer_name,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": TINY_CONTEXT_LENGTH,
            },
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    path = folder / "open_clip_config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def build_tiny_biomedclip_folder(folder: Path, seed: int = 0) -> Path:
    """Create ``folder`` holding a complete, tiny, randomly initialised BiomedCLIP-layout model; return it.

    The CLIP model is built by open_clip from the folder's own config (text tower initialised from config only,
    ``pretrained_text=False``) under a fixed seed, and its state dict is saved as ``open_clip_pytorch_model.bin``,
    so loading the folder afterwards goes through exactly the code path the real BiomedCLIP folder uses.
    The global torch RNG state is left untouched.
    """
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(_bert_config(len(vocab)), indent=2), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": True,
                "model_max_length": 512,
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
        ),
        encoding="utf-8",
    )
    write_open_clip_config(folder)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False, device="cpu")
        # Random weights at initializer_range 0.02 make every text look alike; widen them so tests can tell texts apart.
        with torch.no_grad():
            for name, param in model.text.named_parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.5)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder
