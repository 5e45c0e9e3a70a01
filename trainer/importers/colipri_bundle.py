"""``medfinder import colipri``: COLIPRI's towers -> a verified, parity-checked MedFinder model bundle.

Steps: rebuild COLIPRI from the local weights folder (:mod:`.colipri_model`), export the image graph
(``[B, 1, N, N, N]`` -> pooled, projected, L2-normalised ``[B, 768]``) and the text graph (CXR-BERT + attention
pooling, L2-normalised) with :mod:`trainer.export.onnx_export`, write CXR-BERT's tokenizer as ``tokenizer.json``
(truncation at 512 word-pieces, as COLIPRI's processor), write a manifest whose preprocessing is COLIPRI's
(``fit: crop_or_pad``) and whose domain is chest CT, then compare onnxruntime with PyTorch (:func:`check_parity`)
and only then move the folder into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config.settings import PreprocessingSettings
from model_export.bundle_manifest import (
    IMAGE_ENCODER_FILE,
    TEXT_ENCODER_FILE,
    TOKENIZER_FILE,
    BundleManifest,
    finalize_manifest,
    sha256_file,
)
from model_export.errors import BundleError
from model_export.preprocessing import describe_spec, load_volume, preprocess_volume
from model_export.runtime import CPU, ModelBundle, load_bundle
from trainer.export.bundle_export import package_versions, place_bundle
from trainer.export.onnx_export import (
    EXPORTER,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    MAX_BATCH,
    OPSET,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    export_graph,
)
from trainer.export.parity import (
    MIN_COSINE,
    compare,
    parity_result,
    parity_texts,
    require_parity,
)
from trainer.importers.colipri_model import (
    MAX_TOKENS,
    ColipriImageGraph,
    ColipriModel,
    ColipriTextGraph,
    load_colipri,
)

logger = logging.getLogger(__name__)

Reporter = Callable[[str], None]
PARITY_WINDOW_WORDS = 200  # sizes parity_texts' long report (~500 words): beyond 512 word-pieces, so truncated
CHUNKING = "none: one whole text (whitespace collapsed), truncated at 512 word-pieces, as COLIPRI's processor"
POOLING = "COLIPRI's attention pooling over the tokens (inside text_encoder.onnx), then L2 normalisation"


def colipri_preprocessing(colipri: ColipriModel) -> PreprocessingSettings:
    """COLIPRI's torchio pipeline as MedFinder preprocessing settings (``fit: crop_or_pad``).

    torchio pads with the image minimum (``padding_mode: minimum``); after the clamp to [-1000, 1000] HU that is
    the low end of the output range whenever the scan holds air at -1000 HU or below (every chest CT), so the
    recipe pads with that constant.
    """
    recipe = colipri.recipe
    if recipe.padding_mode != "minimum":
        raise BundleError(f"COLIPRI pads with {recipe.padding_mode!r}; this importer implements 'minimum' only")
    if recipe.orientation not in ("RAS", "SAR"):
        raise BundleError(f"COLIPRI orientation {recipe.orientation!r}: the runtime feeds RAS or SAR arrays only")
    size = recipe.input_size
    return PreprocessingSettings(
        orientation="RAS", hu_window=recipe.hu_window, output_range=recipe.output_range, target_shape=(size,) * 3,
        target_spacing_mm=(recipe.spacing_mm,) * 3, crop_foreground=False, min_slices=8, fit="crop_or_pad",
        pad_value=recipe.output_range[0], axis_order=recipe.orientation)


def write_tokenizer(colipri: ColipriModel, folder: Path) -> Path:
    """CXR-BERT's tokenizer for the ``tokenizers``-only runtime: truncate at 512, pad to the batch's longest."""
    from tokenizers import Tokenizer

    backend = getattr(colipri.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BundleError(f"the tokenizer in {colipri.text_tower} has no `tokenizers` backend (not a fast tokenizer)")
    tokenizer = Tokenizer.from_str(backend.to_str())
    pad_token = colipri.tokenizer.pad_token or "[PAD]"
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise BundleError(f"the tokenizer in {colipri.text_tower} has no padding token {pad_token!r}")
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=0)
    path = Path(folder) / TOKENIZER_FILE
    tokenizer.save(str(path), pretty=False)
    return path


def export_graphs(colipri: ColipriModel, folder: Path) -> None:
    """``image_encoder.onnx`` (dynamic batch) and ``text_encoder.onnx`` (dynamic batch and length)."""
    from torch.export import Dim

    size = colipri.recipe.input_size
    example = torch.rand(2, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    batch = Dim("batch", min=1, max=MAX_BATCH)
    export_graph(ColipriImageGraph(colipri.model), (example,), folder / IMAGE_ENCODER_FILE, [IMAGE_INPUT], IMAGE_OUTPUT,
            {IMAGE_INPUT: {0: batch}})
    encoded = colipri.tokenizer(list(parity_texts(8)[:2]), padding=True, return_tensors="pt")
    tokens = Dim("tokens", min=2, max=MAX_TOKENS)
    export_graph(ColipriTextGraph(colipri.model), (encoded["input_ids"], encoded["attention_mask"]),
            folder / TEXT_ENCODER_FILE, list(TEXT_INPUTS), TEXT_OUTPUT,
            {name: {0: batch, 1: tokens} for name in TEXT_INPUTS})


def _versions() -> dict[str, str | None]:
    versions = package_versions()
    for name in ("colipri", "dynamic-network-architectures", "timm", "torchio"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(colipri: ColipriModel, spec: PreprocessingSettings, name: str | None,
                   version: str | None) -> dict[str, Any]:
    """Everything but the hashes and parity (added by finalize_manifest and the parity step)."""
    description = describe_spec(spec)
    text_config = colipri.text_tower / "config.json"
    return {
        "model": {
            "name": name or "colipri",
            "version": version or f"colipri-crm-{colipri.recipe.input_size}",
            "architecture": "COLIPRI: Primus-M 3D ViT (8^3 patches, depth 16, 864-d, RoPE) + 1x1x1 projection + "
                            "attention pooling; CXR-BERT text tower + attention pooling; shared 768-d space",
            "source": {"package": f"colipri {_versions()['colipri']}", "weights_repo": "microsoft/colipri",
                       "text_tower_repo": "microsoft/BiomedVLP-CXR-BERT-specialized",
                       "paper": "Wald et al., Comprehensive language-image pre-training for 3D medical image "
                                "understanding, arXiv:2510.15042", "licence": "MIT",
                       "text_weights_from": colipri.text_weights_from},
            "checkpoint": {"file": colipri.weights.name, "sha256": sha256_file(colipri.weights)},
            "text_tower": {"name": colipri.text_tower.name, "config_sha256": sha256_file(text_config)},
            "input_size": colipri.recipe.input_size,
        },
        "embedding_dim": colipri.embedding_dim,
        "image_encoder": {"file": IMAGE_ENCODER_FILE, "input": IMAGE_INPUT, "output": IMAGE_OUTPUT,
                          "input_shape": ["batch", *description["input_shape"]], "dtype": "float32"},
        "text_encoder": {"file": TEXT_ENCODER_FILE, "inputs": list(TEXT_INPUTS), "output": TEXT_OUTPUT,
                         "tokenizer": TOKENIZER_FILE, "max_tokens": MAX_TOKENS, "text_preprocessing": "none",
                         "dtype": "int64"},
        "preprocessing": description,
        "text": {"window_words": MAX_TOKENS, "max_chunks": 1, "sampler_enabled": False, "text_preprocessing": "none",
                 "max_tokens": MAX_TOKENS, "chunking": CHUNKING, "pooling": POOLING},
        "domain": {"modalities": ["CT"], "body_regions": ["CHEST"]},
        "opset": OPSET,
        "exporter": EXPORTER,
        "versions": _versions(),
        "training": {"kind": "imported pretrained model (COLIPRI-CRM, trained by its authors on chest CT and "
                             "reports from Turkey and the USA; research use, not for clinical practice)"},
        "metrics": None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _torchio_reference(colipri: ColipriModel, series: Path) -> np.ndarray:
    """The real series through COLIPRI's own torchio transform (its processor config), ``[1, N, N, N]``."""
    import torchio as tio
    from colipri import get_processor

    recipe = colipri.recipe
    processor = get_processor(image_only=True, input_size=recipe.input_size, orientation=recipe.orientation)
    volume = load_volume(series)  # the same HU volume both sides: this compares the recipes, not DICOM readers
    image = tio.ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(volume.array)[np.newaxis]),
                            affine=volume.affine)
    return processor.process_images(image)[0].data.numpy().astype(np.float32)


@torch.no_grad()
def check_parity(colipri: ColipriModel, bundle: ModelBundle, real_series: Path | None,
                 min_cosine: float = MIN_COSINE, seed: int = 0) -> dict[str, Any]:
    """COLIPRI in PyTorch (its own processor for images and text) vs the bundle served by onnxruntime."""
    model = colipri.model
    size = colipri.recipe.input_size
    volumes = np.random.default_rng(seed).uniform(-1, 1, (2, 1, size, size, size)).astype(np.float32)

    def torch_image(batch: np.ndarray) -> np.ndarray:
        return model.encode_image(torch.from_numpy(batch), pool=True, project=True, normalize=True).numpy()

    image_cases = {"random_batch2": compare(torch_image(volumes), bundle.embed_volume(volumes))}
    preprocessing = None
    if real_series is not None:
        reference_input = _torchio_reference(colipri, real_series)
        ours = preprocess_volume(load_volume(real_series), bundle.preprocessing)
        preprocessing = {"max_abs_diff_vs_torchio": float(np.abs(ours - reference_input).max()),
                         "shape": list(ours.shape)}
        image_cases["real_series"] = compare(torch_image(reference_input[np.newaxis]),
                                             bundle.embed_series(real_series)[np.newaxis])
    else:
        logger.warning("parity: no real CT series; random volumes only")

    texts = parity_texts(PARITY_WINDOW_WORDS)
    encoded = colipri.tokenizer(texts, max_length=MAX_TOKENS, padding="max_length", truncation=True,
                                return_tensors="pt")  # exactly colipri.processor.Processor.process_text
    reference = model.encode_text(encoded["input_ids"], encoded["attention_mask"]).numpy()
    text_cases = {"reports": compare(reference, bundle.embed_text(texts)),
                  "single_query": compare(reference[:1], bundle.embed_text(texts[0])[np.newaxis])}

    return parity_result(image_cases, text_cases, min_cosine=min_cosine, real_series=real_series, bundle=bundle,
                         preprocessing_vs_torchio=preprocessing,
                         reference="colipri's Model.encode_image/encode_text in PyTorch; images through colipri's "
                                   "torchio transform, texts through its processor's tokenizer call (padding to 512)",
                         texts={"n": len(texts), "words": [len(t.split()) for t in texts]})


def import_colipri(
    weights: Path,
    out: Path,
    *,
    text_tower: Path | None = None,
    input_size: int | None = None,
    orientation: str | None = None,
    real_series: Path | None = None,
    name: str | None = None,
    version: str | None = None,
    force: bool = False,
    threads: int | None = None,
    report: Reporter = logger.info,
) -> BundleManifest:
    """Import COLIPRI from ``weights`` into the bundle folder ``out``; returns the final manifest."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    if threads:
        torch.set_num_threads(int(threads))
    report(f"loading COLIPRI from {weights}")
    colipri = load_colipri(Path(weights), text_tower, input_size, orientation)
    spec = colipri_preprocessing(colipri)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        started = time.perf_counter()
        export_graphs(colipri, staging)
        write_tokenizer(colipri, staging)
        report(f"image and text encoders exported ({time.perf_counter() - started:.1f} s)")
        manifest = finalize_manifest(staging, build_manifest(colipri, spec, name, version))
        report("parity check: onnxruntime (CPU) vs PyTorch" + (f" incl. real series {real_series.name}"
                                                              if real_series else " (no real series)"))
        bundle = load_bundle(staging, providers=[CPU], threads=threads)
        parity = check_parity(colipri, bundle, real_series)
        written = manifest.as_dict()
        manifest = finalize_manifest(staging, {**written, "parity": parity}, files=written["files"])
        report(f"parity: min cosine image {parity['image_encoder']['min_cosine']:.7f}, "
               f"text {parity['text_encoder']['min_cosine']:.7f}; max |diff| {parity['max_abs_diff']:.2e}")
        require_parity(parity)
        place_bundle(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"bundle {manifest.bundle_id} written to {out}")
    return manifest
