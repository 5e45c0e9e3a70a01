"""The serving runtime: a verified model bundle behind ``embed_volume``, ``embed_series`` and ``embed_text``.

No torch here, by design: workers install the torch-free core (numpy, onnxruntime, tokenizers, pydantic) and
run the same preprocessing module and text windows as training, with the recipe recorded in the bundle.

    bundle = load_bundle(path, expected_dim=512)      # hashes checked, sessions built, providers logged
    bundle.embed_series("/dicom/series-folder")        # [E] unit vector
    bundle.embed_text("left lower lobe consolidation") # [E]; a list gives [N, E]

Execution providers: CUDA first when this onnxruntime has it (TensorRT before it when asked for), CPU last.
onnxruntime-gpu falls back to CPU silently when CUDA or cuDNN cannot load, so the providers that actually
run are read back from each session and logged, with a warning when a GPU provider was wanted but is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from config.settings import PreprocessingSettings
from model_export.bundle_manifest import BundleManifest, verify_bundle
from model_export.errors import BundleError, BundleInputError, BundleMismatchError
from model_export.preprocessing import (
    RECIPE_NAME,
    RECIPE_VERSION,
    SUPPORTED_RECIPE_VERSIONS,
    load_volume,
    preprocess_volume,
)
from model_export.text_cleaning import text_cleaner
from model_export.text_windows import EmptyReportError, inference_chunks

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

__all__ = ["ModelBundle", "TextHandling", "load_bundle", "select_providers"]

#: Keys of a manifest's ``preprocessing`` that describe the recipe for people; every other key must be a
#: ``PreprocessingSettings`` field this runtime applies (an unknown one is a step it cannot follow).
DESCRIPTIVE_RECIPE_KEYS = frozenset({"recipe", "recipe_version", "input_shape", "dtype", "interpolation", "steps", "axes",
                                     "dicom_assembly"})
#: Fields that recipe version 1 does not have (fit, pad and axis order came with version 2).
RECIPE_V2_FIELDS = frozenset({"fit", "pad_value", "axis_order"})


@dataclass(frozen=True)
class TextHandling:
    """How a report becomes the texts whose embeddings are mean-pooled (``model_export.text_windows``)."""

    window_words: int
    max_chunks: int
    sampler_enabled: bool
    text_preprocessing: str

    @classmethod
    def from_manifest(cls, text: dict[str, Any]) -> TextHandling:
        try:
            return cls(int(text["window_words"]), int(text["max_chunks"]), bool(text["sampler_enabled"]),
                       str(text.get("text_preprocessing", "none")))
        except (KeyError, TypeError, ValueError) as error:
            raise BundleError(f"manifest 'text' section is incomplete: {error!r}") from None


def select_providers(requested: Sequence[str] | None = None, tensorrt: bool = False) -> list[str]:
    """Providers to ask onnxruntime for: ``requested`` as given, else CUDA (after TensorRT if wanted) then CPU."""
    available = ort.get_available_providers()
    if requested is not None:
        unknown = [name for name in requested if name not in available]
        if unknown or not requested:
            raise BundleMismatchError(f"execution providers {list(requested)} not available; this onnxruntime "
                                      f"({ort.__version__}) offers {available}")
        return list(requested)
    preferred = ([TENSORRT] if tensorrt else []) + [CUDA, CPU]
    return [name for name in preferred if name in available]


def installed_onnxruntimes() -> list[str]:
    """Which of onnxruntime / onnxruntime-gpu pip has installed (both at once break each other)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _session(path: Path, providers: list[str], threads: int | None, memory_arena: bool) -> ort.InferenceSession:
    """One session. ``memory_arena=False`` for the image graph: with the arena, onnxruntime's CPU memory for a
    96x224x224 ResNet-50 grew from 2.8 to 5.5 GB over two calls (21 GB at batch 4), at no speed gain."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = memory_arena
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or 0)  # 0 = onnxruntime's default (all physical cores)
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise BundleError(f"{path}: onnxruntime cannot load it: {error}") from None


def _check_io(session: ort.InferenceSession, path: Path, inputs: list[str], output: str) -> None:
    got_inputs = [item.name for item in session.get_inputs()]
    got_outputs = [item.name for item in session.get_outputs()]
    if got_inputs != inputs or output not in got_outputs:
        raise BundleMismatchError(f"{path}: graph has inputs {got_inputs} and outputs {got_outputs}; the manifest "
                                  f"says inputs {inputs} and output {output!r}")


class ModelBundle:
    """Two onnxruntime sessions, the tokenizer and the recipes of one verified bundle."""

    def __init__(self, path: Path, manifest: BundleManifest, providers: list[str], threads: int | None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.bundle_id = manifest.bundle_id
        self.embedding_dim = manifest.embedding_dim
        self.preprocessing = self._preprocessing_spec(manifest.preprocessing)
        self.input_shape = (1, *self.preprocessing.target_shape)
        self.text = TextHandling.from_manifest(manifest.text)
        self._clean = text_cleaner(self.text.text_preprocessing)

        image, text = manifest.image_encoder, manifest.text_encoder
        self._image_input, self._image_output = image.input, image.output
        self._text_inputs, self._text_output = list(text.inputs), text.output
        image_path, text_path = self.path / image.file, self.path / text.file
        self._image = _session(image_path, providers, threads, memory_arena=False)
        self._text = _session(text_path, providers, threads, memory_arena=True)
        _check_io(self._image, image_path, [self._image_input], self._image_output)
        _check_io(self._text, text_path, self._text_inputs, self._text_output)
        for session, path in ((self._image, image_path), (self._text, text_path)):
            width = session.get_outputs()[0].shape[-1]
            if isinstance(width, int) and width != self.embedding_dim:
                raise BundleMismatchError(f"{path}: outputs {width}-d vectors, manifest says {self.embedding_dim}")
        self.tokenizer = self._load_tokenizer(self.path / text.tokenizer, text.max_tokens)
        self.providers = {"image_encoder": self._image.get_providers(), "text_encoder": self._text.get_providers()}

    # ------------------------------------------------------------------ loading helpers
    @staticmethod
    def _preprocessing_spec(description: dict[str, Any]) -> PreprocessingSettings:
        """The manifest's recipe as settings, or an error when this runtime cannot follow it exactly."""
        recipe, version = description.get("recipe", RECIPE_NAME), str(description.get("recipe_version"))
        if recipe != RECIPE_NAME:
            raise BundleMismatchError(f"bundle preprocessing recipe {recipe!r} is unknown; this runtime implements "
                                      f"{RECIPE_NAME!r} only")
        if version not in SUPPORTED_RECIPE_VERSIONS:
            raise BundleMismatchError(f"bundle preprocessing recipe version {description.get('recipe_version')!r}, "
                                      f"this runtime implements {', '.join(map(repr, SUPPORTED_RECIPE_VERSIONS))}")
        known = set(PreprocessingSettings.model_fields) - (RECIPE_V2_FIELDS if version == RECIPE_VERSION else set())
        unknown = sorted(set(description) - known - DESCRIPTIVE_RECIPE_KEYS)
        if unknown:
            raise BundleMismatchError(f"bundle preprocessing (recipe {recipe!r} version {version}) has fields this "
                                      f"runtime does not implement: {unknown}")
        fields = {name: description[name] for name in PreprocessingSettings.model_fields if name in description}
        try:
            spec = PreprocessingSettings.model_validate(fields)
        except ValueError as error:
            raise BundleError(f"manifest 'preprocessing' is invalid: {error}") from None
        if list(description.get("input_shape", [])) != [1, *spec.target_shape]:
            raise BundleError(f"manifest input_shape {description.get('input_shape')} != "
                              f"[1, *{list(spec.target_shape)}]")
        return spec

    @staticmethod
    def _load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises plain Exception subclasses from Rust
            raise BundleError(f"{path}: cannot load the tokenizer: {error}") from None
        truncation = tokenizer.truncation or {}
        if truncation.get("max_length") != max_tokens or tokenizer.padding is None:
            raise BundleMismatchError(f"{path}: tokenizer truncates at {truncation.get('max_length')} tokens "
                                      f"(padding {'on' if tokenizer.padding else 'off'}); "
                                      f"the manifest says {max_tokens}")
        return tokenizer

    # ------------------------------------------------------------------ images
    def embed_volume(self, array: np.ndarray, batch_size: int = 4) -> np.ndarray:
        """A preprocessed ``[1, D, H, W]`` volume -> ``[E]``; a ``[B, 1, D, H, W]`` batch -> ``[B, E]`` (float32)."""
        if not isinstance(array, np.ndarray):
            raise BundleInputError(f"volume: expected a numpy.ndarray, got {type(array).__name__}")
        expected = list(self.input_shape)
        if array.dtype != np.float32:
            raise BundleInputError(f"volume dtype: expected float32, got {array.dtype} "
                                   "(run it through model_export.preprocessing.preprocess_volume)")
        if array.ndim == 4 and list(array.shape) == expected:
            batch, single = array[np.newaxis], True
        elif array.ndim == 5 and list(array.shape[1:]) == expected and array.shape[0] > 0:
            batch, single = array, False
        else:
            raise BundleInputError(f"volume shape: expected {expected} or [B, {', '.join(map(str, expected))}], "
                                   f"got {list(array.shape)}")
        if not np.isfinite(batch).all():
            raise BundleInputError("volume contains NaN or infinite values")
        step = max(1, int(batch_size))
        outputs = [
            self._image.run([self._image_output], {self._image_input: np.ascontiguousarray(batch[i : i + step])})[0]
            for i in range(0, len(batch), step)
        ]
        embeddings = np.concatenate(outputs).astype(np.float32, copy=False)
        return embeddings[0] if single else embeddings

    def preprocess_series(self, source: str | Path | Sequence[str | Path]) -> np.ndarray:
        """A DICOM series (folder or files) or NIfTI -> the model input ``[1, D, H, W]`` by the bundle's recipe."""
        return preprocess_volume(load_volume(source), self.preprocessing)

    def embed_series(self, source: str | Path | Sequence[str | Path]) -> np.ndarray:
        """A DICOM series folder or list of its files (or a NIfTI file) -> ``[E]``."""
        return self.embed_volume(self.preprocess_series(source))

    # ------------------------------------------------------------------ text
    def _chunks(self, texts: list[str], single: bool) -> list[list[str]]:
        chunk_lists = []
        for index, text in enumerate(texts):
            where = "text" if single else f"texts[{index}]"
            if not isinstance(text, str):
                raise BundleInputError(f"{where}: expected str, got {type(text).__name__}")
            try:
                chunk_lists.append(inference_chunks(text, self.text.window_words, self.text.max_chunks,
                                                    self.text.sampler_enabled))
            except EmptyReportError:
                raise BundleInputError(f"{where} is empty or whitespace only: there is nothing to embed") from None
        return chunk_lists

    def _embed_chunks(self, chunks: list[str], batch_size: int) -> np.ndarray:
        """Each text -> its ``[E]`` embedding, batched by length so padding stays small."""
        out = np.empty((len(chunks), self.embedding_dim), dtype=np.float32)
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            encodings = self.tokenizer.encode_batch([self._clean(chunks[i]) for i in indices])
            feeds = {
                self._text_inputs[0]: np.array([e.ids for e in encodings], dtype=np.int64),
                self._text_inputs[1]: np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
            out[indices] = self._text.run([self._text_output], feeds)[0]
        return out

    def embed_text(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """A report or query -> ``[E]``; a list -> ``[N, E]``. Long texts: L-word chunks, mean, re-normalised."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items:
            raise BundleInputError("texts: empty list, nothing to embed")
        chunk_lists = self._chunks(items, single)
        flat = [chunk for chunks in chunk_lists for chunk in chunks]
        projected = self._embed_chunks(flat, max(1, int(batch_size)))
        pooled, offset = np.empty((len(items), self.embedding_dim), dtype=np.float32), 0
        for row, chunks in enumerate(chunk_lists):
            pooled[row] = projected[offset : offset + len(chunks)].mean(axis=0)
            offset += len(chunks)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)  # as torch F.normalize
        pooled = (pooled / norms).astype(np.float32, copy=False)
        return pooled[0] if single else pooled

    def describe(self) -> dict[str, Any]:
        """What a worker logs or reports about the loaded model (no patient data)."""
        model = self.manifest.model
        return {"bundle_id": self.bundle_id, "model": model.name, "version": model.version,
                "embedding_dim": self.embedding_dim, "input_shape": list(self.input_shape), "providers": self.providers}


def load_bundle(
    path: str | Path,
    expected_dim: int | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    tensorrt: bool = False,
) -> ModelBundle:
    """Verify ``path`` (every file's SHA-256), check it fits ``expected_dim``, and build its sessions.

    ``providers`` overrides the automatic choice (CUDA, then CPU; TensorRT first with ``tensorrt=True``);
    ``threads`` sets intra-op threads per session (None: onnxruntime's default). Raises
    :class:`BundleIntegrityError` naming the changed file, :class:`BundleMismatchError` for a bundle that does
    not fit (dimension, recipe, providers), :class:`BundleError` otherwise.
    """
    path = Path(path)
    manifest = verify_bundle(path)
    dim = manifest.embedding_dim
    if expected_dim is not None and dim != int(expected_dim):
        raise BundleMismatchError(f"bundle {manifest.bundle_id} embeds into {dim} dimensions, but the index it "
                                  f"is meant for holds {int(expected_dim)}-d vectors")
    if threads is not None and int(threads) < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if len(installed_onnxruntimes()) > 1:
        logger.warning("onnxruntime and onnxruntime-gpu are both installed: they share one folder and break each "
                       "other; keep exactly one (README, Model bundles)")
    wanted = select_providers(providers, tensorrt)
    bundle = ModelBundle(path, manifest, wanted, threads)
    running = sorted({name for names in bundle.providers.values() for name in names[:1]})
    logger.info("bundle loaded: id=%s model=%s dim=%d providers=%s threads=%s", bundle.bundle_id,
                manifest.model.name, dim, bundle.providers, threads or "default")
    if any(name in GPU_PROVIDERS for name in wanted) and not any(name in GPU_PROVIDERS for name in running):
        logger.warning("bundle %s: asked for %s but onnxruntime runs on %s (GPU libraries missing?)",
                       bundle.bundle_id, [n for n in wanted if n in GPU_PROVIDERS], running)
    return bundle
