"""``medfinder export``: a training checkpoint -> a verified, parity-checked model bundle folder.

Steps: rebuild the model from the checkpoint's settings, export both ONNX graphs, write the configured
tokenizer, write the manifest (hashes, recipes, domain from ``data.body_regions``, versions, training data,
metrics), load the folder through the serving runtime on CPU and compare it with PyTorch
(:mod:`trainer.export.parity`), record the figures and only then move the folder into place. A failed parity
check leaves nothing behind and raises.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from config import Settings, dump_settings
from model_export.bundle_manifest import (
    IMAGE_ENCODER_FILE,
    TEXT_ENCODER_FILE,
    TOKENIZER_FILE,
    BundleManifest,
    finalize_manifest,
    sha256_file,
)
from model_export.domain import domain_for_export
from model_export.errors import BundleError
from model_export.preprocessing import describe_spec
from model_export.runtime import CPU, load_bundle
from trainer.engine.loop import load_trained_model
from trainer.evaluation.evaluate import TRAINED
from trainer.export.onnx_export import (
    EXPORTER,
    IMAGE_INPUT,
    IMAGE_OUTPUT,
    OPSET,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    export_image_encoder,
    export_text_encoder,
)
from trainer.export.parity import check_parity, require_parity
from trainer.model.medfinder import MedFinder

logger = logging.getLogger(__name__)

CHUNKING = ("model_export.text_windows.inference_chunks: consecutive window_words-word chunks from the start "
            "(whitespace words), at most max_chunks; one whole text when the sampler is disabled")
POOLING = "mean of the chunk embeddings, then L2 re-normalised (trainer.engine.embedding.embed_reports)"

Reporter = Callable[[str], None]


def package_versions() -> dict[str, str | None]:
    """Versions of what produced the bundle (recorded so a serving problem can be traced to a toolchain)."""
    names = ("torch", "onnx", "onnxscript", "onnxruntime", "transformers", "tokenizers", "monai", "medfinder-node")
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def evaluation_beside(checkpoint: Path, epoch: int) -> dict[str, Any] | None:
    """The test-split results ``medfinder evaluate`` wrote beside ``checkpoint``, if they are for this one."""
    path = Path(checkpoint).with_name("eval-test.json")
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s", path.name)
        return None
    same_file = Path(str(payload.get("checkpoint", ""))).name == Path(checkpoint).name
    if not same_file or payload.get("checkpoint_epoch") != epoch:
        return None
    trained = payload.get("results", {}).get(TRAINED)
    return None if trained is None else {"split": "test", "N": payload.get("N"), "gallery": payload.get("gallery"),
                                         **trained}


def training_description(state: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What the model was trained on, as the checkpoint records it."""
    synthetic = settings.data.manifest is None
    return {
        "kind": "synthetic benchmark (generated findings on public CT; not clinical data)" if synthetic
        else "manifest",
        "data": state.get("data"),
        "synthetic": settings.data.synthetic.model_dump(mode="json") if synthetic else None,
        "skipped_rows": state.get("skipped_rows"),
        "epochs_completed": int(state["epoch"]) + 1,
        "global_step": state.get("global_step"),
        "seed": settings.train.seed,
        "settings": dump_settings(settings),
    }


def build_manifest(model: MedFinder, state: dict[str, Any], settings: Settings, checkpoint: Path,
                   name: str | None, version: str | None) -> dict[str, Any]:
    """Everything but the hashes and parity (added by finalize_manifest and the parity step)."""
    encoder = model.text_encoder
    sampler = settings.model.sampler
    epoch = int(state["epoch"]) + 1
    spec = describe_spec(settings.preprocessing)
    return {
        "model": {
            "name": name or f"medfinder-{settings.model.image.backbone}-{settings.model.text.kind}",
            "version": version or f"epoch{epoch}",
            "architecture": "MedFinder (3D image encoder + token fusion + heads; frozen text tower)",
            "image_backbone": settings.model.image.backbone,
            "fusion": settings.model.fusion,
            "projection": settings.model.projection,
            "text_tower": {"kind": settings.model.text.kind, "name": encoder.name, "feature_dim": encoder.feature_dim},
            "checkpoint": {"file": Path(checkpoint).name, "sha256": sha256_file(checkpoint), "epoch": epoch},
        },
        "embedding_dim": int(model.image_head_out_dim()),
        "image_encoder": {"file": IMAGE_ENCODER_FILE, "input": IMAGE_INPUT, "output": IMAGE_OUTPUT,
                          "input_shape": ["batch", *spec["input_shape"]], "dtype": "float32"},
        "text_encoder": {"file": TEXT_ENCODER_FILE, "inputs": list(TEXT_INPUTS), "output": TEXT_OUTPUT,
                         "tokenizer": TOKENIZER_FILE, "max_tokens": encoder.max_tokens,
                         "text_preprocessing": encoder.text_preprocessing, "dtype": "int64"},
        "preprocessing": spec,
        # What the node may embed with it (model_export.domain): CT of the regions the training data shows.
        "domain": domain_for_export(settings.data.body_regions),
        "text": {"window_words": sampler.window_words, "max_chunks": sampler.max_chunks,
                 "sampler_enabled": sampler.enabled, "text_preprocessing": encoder.text_preprocessing,
                 "max_tokens": encoder.max_tokens, "chunking": CHUNKING, "pooling": POOLING},
        "opset": OPSET,
        "exporter": EXPORTER,
        "versions": package_versions(),
        "training": training_description(state, settings),
        "metrics": {"best": state.get("best"), "val": (state.get("metrics") or {}).get("val"),
                    "test": evaluation_beside(checkpoint, epoch)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def place_bundle(staging: Path, out: Path, force: bool) -> None:
    """Move a finished staging folder to ``out`` (replacing it only with ``force``): a bundle appears whole."""
    if out.exists():
        if force and out.is_dir():
            shutil.rmtree(out)
        elif out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    os.replace(staging, out)


def export_bundle(
    checkpoint: Path,
    out: Path,
    *,
    real_series: Path | None = None,
    name: str | None = None,
    version: str | None = None,
    force: bool = False,
    threads: int | None = None,
    report: Reporter = logger.info,
) -> BundleManifest:
    """Export ``checkpoint`` into the bundle folder ``out``; returns the final manifest."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    if threads:
        torch.set_num_threads(int(threads))
    report(f"loading {checkpoint}")
    model, state, settings = load_trained_model(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        started = time.perf_counter()
        export_image_encoder(model, staging / IMAGE_ENCODER_FILE, tuple(settings.preprocessing.target_shape))
        report(f"image encoder exported ({time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        export_text_encoder(model, staging / TEXT_ENCODER_FILE)
        model.text_encoder.tokenizer_files(staging)
        report(f"text encoder + tokenizer exported ({time.perf_counter() - started:.1f} s)")
        manifest = finalize_manifest(staging, build_manifest(model, state, settings, checkpoint, name, version))

        report("parity check: onnxruntime (CPU) vs PyTorch" + (f" incl. real series {real_series.name}"
                                                              if real_series else " (no real series)"))
        bundle = load_bundle(staging, providers=[CPU], threads=threads)
        parity = check_parity(model, bundle, settings, real_series)
        written = manifest.as_dict()
        manifest = finalize_manifest(staging, {**written, "parity": parity},
                                     files=written["files"])  # graphs unchanged: no re-hash
        report(f"parity: min cosine image {parity['image_encoder']['min_cosine']:.7f}, "
               f"text {parity['text_encoder']['min_cosine']:.7f}; max |diff| {parity['max_abs_diff']:.2e}")
        require_parity(parity)
        place_bundle(staging, out, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"bundle {manifest.bundle_id} written to {out}")
    return manifest
