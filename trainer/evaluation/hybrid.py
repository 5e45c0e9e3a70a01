"""``medfinder evaluate-hybrid``: text search over image vectors, prior-report vectors, and both fused (RRF).

The question it answers honestly: when a gallery study carries a report, how much does searching that report
add to searching the images? Every study of the held-out split of the synthetic benchmark gets a *prior
report* written for the same findings in other words (:mod:`trainer.data.synthetic_rephrase`, an independent
random stream); the query is the benchmark's own report, the one ``medfinder evaluate`` queries text→image
with. Query i's ground truth is gallery study i. Three rankings over the full gallery:

* image only: cosine(query, image vector), the same ranking as ``medfinder evaluate``'s text→image row;
* report only: cosine(query, prior-report vector);
* hybrid: reciprocal rank fusion of the two (Qdrant's formula, ``settings.index.rrf_k``; see
  :mod:`trainer.evaluation.fusion`), what the node's ``search_fused`` does.

Exact cosine in numpy equals the index's exact search; ``trainer`` may not import ``workers`` (layers), so the
index itself is exercised against these numbers in ``tests/test_hybrid_eval.py`` instead.

Embeddings come from the checkpoint through the PyTorch evaluation path (default), or with ``bundle`` from an
exported bundle through ``model_export.runtime`` (onnxruntime), i.e. exactly what serving computes; the gallery
is always the split of the benchmark the checkpoint was trained with, which only the checkpoint records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from config import Settings
from trainer.data.row_checks import RowPolicy
from trainer.data.sources import resolve_manifest
from trainer.data.synthetic import BENCHMARK_FILE
from trainer.data.synthetic_rephrase import StudyText, study_texts
from trainer.engine.embedding import embed_reports, embed_volume_arrays
from trainer.engine.loop import load_trained_model
from trainer.engine.text_features import TextFeatureCache
from trainer.evaluation.evaluate import load_gallery
from trainer.evaluation.fusion import rrf_scores
from trainer.evaluation.metrics import chance_recall, recall_metrics
from trainer.evaluation.report import write_results_json
from trainer.model.medfinder import MedFinder

logger = logging.getLogger(__name__)

IMAGE_ONLY, REPORT_ONLY, HYBRID = "image_only", "report_only", "hybrid"
ROWS = (IMAGE_ONLY, REPORT_ONLY, HYBRID)
# Bundle embeddings must match the checkpoint's to this cosine, or the bundle is not this checkpoint's export.
BUNDLE_MATCH_COSINE = 0.999
_GUARD_ITEMS = 2


@dataclass(frozen=True)
class HybridEmbeddings:
    """Row i of each matrix belongs to gallery study i; all rows unit length."""

    queries: np.ndarray  # [N, E] the benchmark's reports (the query texts)
    images: np.ndarray  # [N, E] image vectors
    reports: np.ndarray  # [N, E] the reworded prior reports


class Encoders(Protocol):
    """What the evaluation needs from a model: unit image and text embeddings."""

    description: dict[str, Any]

    def embed_images(self, arrays: np.ndarray) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


class CheckpointEncoders:
    """The PyTorch evaluation path (``trainer.engine.embedding``), as ``medfinder evaluate`` uses it."""

    def __init__(self, model: MedFinder, settings: Settings, device: torch.device) -> None:
        self.model, self.settings, self.device = model.to(device), settings, device
        self.cache = TextFeatureCache(model.text_encoder)
        self.description = {"engine": "pytorch", "device": str(device)}

    def embed_images(self, arrays: np.ndarray) -> np.ndarray:
        return embed_volume_arrays(self.model, arrays, self.settings.eval.batch_size, self.device)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return embed_reports(self.model, self.cache, texts, self.settings.model.sampler, self.device)


class BundleEncoders:
    """An exported bundle through the serving runtime (onnxruntime; tokenizer, chunking and pooling as served)."""

    def __init__(self, bundle_dir: Path, expected_dim: int) -> None:
        from model_export.runtime import load_bundle

        self.bundle = load_bundle(bundle_dir, expected_dim=expected_dim)
        self.description = {"engine": "onnxruntime", "bundle": str(bundle_dir), **self.bundle.describe()}

    def embed_images(self, arrays: np.ndarray) -> np.ndarray:
        step = 8  # float16 cache -> float32 a few volumes at a time
        out = [self.bundle.embed_volume(np.asarray(arrays[i : i + step], dtype=np.float32))
               for i in range(0, len(arrays), step)]
        return np.concatenate(out)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.bundle.embed_text(texts)


def embed_gallery(encoders: Encoders, arrays: np.ndarray, texts: Sequence[StudyText]) -> HybridEmbeddings:
    """Image vectors, query vectors (original reports) and prior-report vectors (rewordings)."""
    return HybridEmbeddings(
        queries=np.asarray(encoders.embed_texts([t.original for t in texts]), dtype=np.float64),
        images=np.asarray(encoders.embed_images(arrays), dtype=np.float64),
        reports=np.asarray(encoders.embed_texts([t.alternate.text for t in texts]), dtype=np.float64),
    )


def hybrid_metrics(
    embeddings: HybridEmbeddings, rrf_k: int, ks: Sequence[int] = (1, 5, 10), prefetch: int | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`recall_metrics` of the three rankings (ground truth on the diagonal), keyed by :data:`ROWS`."""
    image_scores = embeddings.queries @ embeddings.images.T
    report_scores = embeddings.queries @ embeddings.reports.T
    fused = rrf_scores([image_scores, report_scores], rrf_k, prefetch)
    return {
        IMAGE_ONLY: recall_metrics(image_scores, ks=ks),
        REPORT_ONLY: recall_metrics(report_scores, ks=ks),
        HYBRID: recall_metrics(fused, ks=ks),
    }


def phrasing_summary(texts: Sequence[StudyText]) -> dict[str, Any]:
    """How different the two phrasings are, and whether the rewordings state exactly the labelled findings."""
    n = len(texts)
    identical = sum(t.identical for t in texts)
    reproduced = sum(t.reproduced for t in texts)
    up_to_sizes = sum(t.reproduced_up_to_sizes for t in texts)
    same_findings = sum(t.alternate_findings == frozenset(t.labels) for t in texts)
    positives = [s for t in texts for s in t.alternate_positives]
    shared = sum(s in set(t.original_positives) for t in texts for s in t.alternate_positives)
    return {
        "n": n,
        "identical": identical,
        "identical_fraction": identical / n if n else 0.0,
        "same_findings": same_findings,
        "reproduced": reproduced,
        "reproduced_fraction": reproduced / n if n else 0.0,
        "reproduced_up_to_sizes": up_to_sizes,
        "positive_sentences": len(positives),
        "positive_sentences_shared_fraction": shared / len(positives) if positives else 0.0,
        "mean_words": {
            "query": float(np.mean([len(t.original.split()) for t in texts])) if n else 0.0,
            "prior_report": float(np.mean([t.alternate.n_words for t in texts])) if n else 0.0,
        },
    }


def format_hybrid_table(payload: dict[str, Any]) -> str:
    """The three rows and chance: R@K (%), MdR, MnR, with N, the fusion and the phrasing facts under it."""
    results, n, k = payload["results"], payload["N"], payload["rrf_k"]
    depth = f", top {payload['rrf_prefetch']} of each" if payload.get("rrf_prefetch") else ""
    labels = {IMAGE_ONLY: "image only", REPORT_ONLY: "prior report only", HYBRID: f"hybrid (RRF, k={k}{depth})"}
    columns = [key for key in results[IMAGE_ONLY] if key.startswith("R@")] + ["MdR", "MnR"]
    rows = [(labels[name], results[name]) for name in ROWS] + [("chance", payload["chance"])]
    width = max(len(name) for name, _ in rows)
    lines = [
        (f"Hybrid text→image retrieval, split {payload['split']}, N = {n} (full gallery); R@K in %, "
         "ranks optimistic on ties"),
        f"{'Method'.ljust(width)} | " + "  ".join(c.rjust(6) for c in columns),
        "-" * (width + 3 + 8 * len(columns)),
    ]
    for name, entry in rows:
        lines.append(f"{name.ljust(width)} | " + "  ".join(f"{float(entry[c]):6.2f}" for c in columns))
    for name in ROWS:
        entry = results[name]
        if entry.get("n_tied_queries"):
            pess = entry["pessimistic"]
            lines.append(f"ties: {labels[name]} has {entry['n_tied_queries']} tied queries; pessimistic "
                         + ", ".join(f"{c} = {pess[c]:.2f}" for c in columns))
    phrasing = payload["phrasing"]
    lines.append(
        f"query = the benchmark's report; prior report = the same findings reworded (identical texts: "
        f"{phrasing['identical']}/{phrasing['n']}; positive sentences worded alike: "
        f"{100 * phrasing['positive_sentences_shared_fraction']:.1f} %); encoder: {payload['encoder']['engine']}"
    )
    return "\n".join(lines) + "\n"


def _check_bundle_matches(bundle: Encoders, reference: Encoders, arrays: np.ndarray, texts: list[str]) -> float:
    """Refuse a bundle that is not this checkpoint's export: its embeddings must match the PyTorch ones."""
    pairs = [(bundle.embed_images(arrays), reference.embed_images(arrays)),
             (bundle.embed_texts(texts), reference.embed_texts(texts))]
    cosine = min(float(np.min(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=1)))
                 for a, b in pairs)
    if cosine < BUNDLE_MATCH_COSINE:
        raise ValueError(f"the bundle's embeddings differ from the checkpoint's (min cosine {cosine:.4f} < "
                         f"{BUNDLE_MATCH_COSINE}): it was not exported from this checkpoint")
    return cosine


def _benchmark_record(settings: Settings, progress: bool) -> dict[str, Any]:
    manifest = resolve_manifest(settings, progress=progress)
    path = Path(manifest).parent / BENCHMARK_FILE
    if not path.is_file():
        raise ValueError(f"hybrid evaluation needs the synthetic benchmark (its generator writes the second "
                         f"report); {manifest} has no {BENCHMARK_FILE} beside it")
    return json.loads(path.read_text(encoding="utf-8"))


def evaluate_hybrid(
    checkpoint: Path,
    split: str = "test",
    out: Path | None = None,
    bundle: Path | None = None,
    rrf_k: int | None = None,
    variant: int = 1,
    progress: bool = True,
    prefetch: int | None = None,
) -> dict[str, Any]:
    """Run the hybrid evaluation of ``checkpoint`` (or of ``bundle``, its export) on ``split``; print, write JSON.

    ``prefetch``: read only the top ``prefetch`` of each ranking before fusing (a server's prefetch limit);
    None fuses the full rankings. With a limit, studies in neither list share the last place, so only R@K for
    K <= ``prefetch`` compares with the full fusion; MdR/MnR then count them optimistically.
    """
    model, state, settings = load_trained_model(Path(checkpoint))
    k = int(rrf_k if rrf_k is not None else settings.index.rrf_k)
    benchmark = _benchmark_record(settings, progress)
    policy = RowPolicy(settings.data.on_bad_row)
    gallery = load_gallery(settings, split, policy, progress)
    texts = study_texts(benchmark, [(row.volume_id, row.report) for row in gallery.rows], variant)
    phrasing = phrasing_summary(texts)
    if phrasing["same_findings"] != phrasing["n"]:
        raise RuntimeError(f"{phrasing['n'] - phrasing['same_findings']} reworded report(s) do not state exactly "
                           "their study's findings; the rewording is broken")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = CheckpointEncoders(model, settings, device)
    encoders: Encoders = reference
    extra: dict[str, Any] = {}
    if bundle is not None:
        encoders = BundleEncoders(Path(bundle), expected_dim=settings.model.embedding_dim)
        guard_texts = [t.original for t in texts[:_GUARD_ITEMS]]
        extra["bundle_min_cosine_vs_checkpoint"] = _check_bundle_matches(
            encoders, reference, gallery.arrays[:_GUARD_ITEMS], guard_texts)
    embeddings = embed_gallery(encoders, gallery.arrays, texts)
    ks = tuple(settings.eval.recall_ks)
    results = hybrid_metrics(embeddings, k, ks, prefetch)
    payload: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_epoch": state["epoch"] + 1,
        "split": split,
        "N": len(gallery),
        "gallery": "full",
        "skipped_rows": policy.summary(),
        "rrf_k": k,
        "rrf": "score = sum over {image, report} of 1 / (k + 0-based position), as Qdrant's Fusion.Rrf",
        "rrf_prefetch": prefetch,  # None: the full rankings are fused
        "query": "the benchmark's report of each study (the text→image query of medfinder evaluate)",
        "prior_report": f"the same findings reworded (rephrase variant {variant}, an independent random stream)",
        "encoder": {**encoders.description, **extra},
        "phrasing": phrasing,
        "chance": chance_recall(len(gallery), ks),
        "results": results,
    }
    payload["table"] = format_hybrid_table(payload)
    suffix = "-bundle" if bundle is not None else ""
    out = Path(out) if out is not None else Path(checkpoint).with_name(f"hybrid-{split}{suffix}.json")
    write_results_json(out, payload)
    logger.info("event=hybrid_eval_done split=%s n=%d rrf_k=%d engine=%s r10_image=%.1f r10_report=%.1f "
                "r10_hybrid=%.1f", split, len(gallery), k, encoders.description["engine"],
                results[IMAGE_ONLY].get("R@10", float("nan")), results[REPORT_ONLY].get("R@10", float("nan")),
                results[HYBRID].get("R@10", float("nan")))
    print(payload["table"])
    print(f"results written to {out}")
    return payload
