"""Export-time parity: the bundle served by onnxruntime (CPU) must reproduce the PyTorch model.

Both sides run their full inference path, not just the graphs: on the PyTorch side the evaluation code
(``trainer.engine.embedding``: ``embed_volume_arrays`` and ``embed_reports`` with its chunking and pooling),
on the bundle side :class:`model_export.runtime.ModelBundle` (tokenizer file, text clean-up, chunking,
pooling, the preprocessing recipe from the manifest). Inputs: random volumes (a batch of 2), a real CT
series from the shared data when present (batch of 1, through ``embed_series``), and several texts
including a multi-chunk report and one with HTML entities and odd whitespace.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config.settings import Settings
from model_export.errors import ParityError
from model_export.preprocessing import load_volume, preprocess_volume
from model_export.runtime import ModelBundle
from trainer.engine.embedding import embed_reports, embed_volume_arrays
from trainer.engine.text_features import TextFeatureCache
from trainer.model.medfinder import MedFinder

logger = logging.getLogger(__name__)

MIN_COSINE = 0.9999
REAL_SERIES_DATASET = ("ct", "lung-pet-ct-dx")

_REPORT_SENTENCES = (
    "The lungs are hyperinflated with centrilobular emphysema predominantly in both upper lobes.",
    "There is a spiculated nodule measuring 14 mm in the right upper lobe, suspicious for malignancy.",
    "No pleural effusion or pneumothorax is seen.",
    "Mediastinal lymph nodes are not enlarged; the largest measures 8 mm in short axis.",
    "Subsegmental atelectasis is present at the left lung base.",
    "The heart size is normal and there is no pericardial effusion.",
    "Impression: right upper lobe nodule, follow-up CT in three months is recommended.",
)


def long_report(min_words: int) -> str:
    """A deterministic report of at least ``min_words`` words (cycling through plausible sentences)."""
    words: list[str] = []
    index = 0
    while len(words) < min_words:
        words.extend(_REPORT_SENTENCES[index % len(_REPORT_SENTENCES)].split())
        index += 1
    return " ".join(words)


def parity_texts(window_words: int) -> list[str]:
    """Queries and reports: short, medium, messy (entities, tabs, newlines) and one spanning several chunks."""
    return [
        "pleural effusion",
        "Small nodule in the right upper lobe; no consolidation.",
        "Mild  emphysema &amp; bilateral\tatelectasis.\n\nHeart size&nbsp;normal \u2013 no effusion.",
        long_report(int(window_words * 2.5) + 7),
    ]


def find_real_series(shared_data: Path) -> Path | None:
    """The first Lung-PET-CT-Dx series folder (one holding ``.dcm`` files) of the shared data, or None."""
    root = Path(shared_data).joinpath(*REAL_SERIES_DATASET)
    if not root.is_dir():
        return None
    series = sorted(p for p in root.iterdir() if p.is_dir() and any(f.suffix.lower() == ".dcm" for f in p.iterdir()))
    return series[0] if series else None


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float | int]:
    """Row-wise cosine (worst) and the largest absolute difference of two ``[N, E]`` embedding sets."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ParityError(f"shape mismatch: PyTorch {reference.shape}, onnxruntime {candidate.shape}")
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosines = (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-12)
    return {"n": int(len(reference)), "min_cosine": float(cosines.min()),
            "max_abs_diff": float(np.abs(reference - candidate).max())}


def _summarise(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"min_cosine": min(c["min_cosine"] for c in cases.values()),
            "max_abs_diff": max(c["max_abs_diff"] for c in cases.values()), "cases": cases}


@torch.no_grad()
def check_parity(model: MedFinder, bundle: ModelBundle, settings: Settings, real_series: Path | None,
                 min_cosine: float = MIN_COSINE, seed: int = 0) -> dict[str, Any]:
    """Compare every embedding; returns the figures (stored under ``parity`` in the manifest).

    ``passed`` is False when any embedding's cosine to its PyTorch twin is below ``min_cosine``
    (:func:`require_parity` turns that into an error).
    """
    model.eval()
    device = torch.device("cpu")
    shape = tuple(settings.preprocessing.target_shape)
    volumes = np.random.default_rng(seed).random((2, 1, *shape), dtype=np.float32)
    image_cases = {"random_batch2": compare(embed_volume_arrays(model, volumes, 2, device),
                                            bundle.embed_volume(volumes))}
    if real_series is not None:
        array = preprocess_volume(load_volume(real_series), settings.preprocessing)
        reference = embed_volume_arrays(model, array[np.newaxis], 1, device)
        image_cases["real_series"] = compare(reference, bundle.embed_series(real_series)[np.newaxis])
    else:
        logger.warning("parity: no real CT series (shared data absent); random volumes only")

    texts = parity_texts(settings.model.sampler.window_words)
    cache = TextFeatureCache(model.text_encoder)
    reference = embed_reports(model, cache, texts, settings.model.sampler, device)
    text_cases = {"reports": compare(reference, bundle.embed_text(texts)),
                  "single_query": compare(reference[:1], bundle.embed_text(texts[0])[np.newaxis])}

    result = parity_result(image_cases, text_cases, min_cosine=min_cosine, real_series=real_series, bundle=bundle,
                           texts={"n": len(texts), "words": [len(t.split()) for t in texts],
                                  "window_words": settings.model.sampler.window_words})
    image, text = result["image_encoder"], result["text_encoder"]
    logger.info("parity: image min cosine %.7f (max |diff| %.2e), text min cosine %.7f (max |diff| %.2e)",
                image["min_cosine"], image["max_abs_diff"], text["min_cosine"], text["max_abs_diff"])
    return result


def parity_result(image_cases: dict[str, dict[str, Any]], text_cases: dict[str, dict[str, Any]], *,
                  min_cosine: float, real_series: Path | str | None, bundle: Any, **details: Any) -> dict[str, Any]:
    """The parity record a manifest keeps: per-tower summaries, the overall minimum cosine and largest
    difference, whether it passed ``min_cosine``, and ``details`` of how the reference was made."""
    image, text = _summarise(image_cases), _summarise(text_cases)
    result = {
        "threshold_min_cosine": min_cosine,
        "min_cosine": min(image["min_cosine"], text["min_cosine"]),
        "max_abs_diff": max(image["max_abs_diff"], text["max_abs_diff"]),
        "image_encoder": image,
        "text_encoder": text,
        "real_series": None if real_series is None else Path(real_series).name,
        **details,
        "runtime": {"providers": bundle.providers},
    }
    result["passed"] = bool(result["min_cosine"] >= min_cosine)
    return result


def require_parity(result: dict[str, Any]) -> None:
    """Raise :class:`ParityError` (with the figures) unless :func:`check_parity`'s result passed."""
    if result["passed"]:
        return
    image, text = result["image_encoder"], result["text_encoder"]
    raise ParityError(
        f"parity check failed: onnxruntime vs PyTorch min cosine {result['min_cosine']:.6f} < "
        f"{result['threshold_min_cosine']} (image {image['min_cosine']:.6f}, text {text['min_cosine']:.6f}; "
        f"max |diff| {result['max_abs_diff']:.2e})"
    )
