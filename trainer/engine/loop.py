"""``medfinder train``: the training loop.

One function, :func:`train`, runs on a CPU, a GPU, or under ``torchrun`` on several (DDP). Each epoch
draws a seeded permutation of the training set (sharded across ranks), makes two augmented views,
takes a sampled window of each report through the frozen text tower (features cached by text), and
minimises L_mse + α·L_sim. After each validation it writes ``last.pt``, updates ``best.pt`` when the
validation text→image R@10 improves, and appends a line to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from config import Settings, dump_settings
from model_export.text_windows import sample_window
from trainer.data.augment import ViewAugmenter
from trainer.data.row_checks import RowPolicy
from trainer.data.sources import load_splits
from trainer.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from trainer.engine.distributed import DistributedContext, init_distributed, shutdown_distributed
from trainer.engine.embedding import embed_reports, embed_volume_arrays
from trainer.engine.optim import build_optimizer, build_scheduler
from trainer.engine.text_features import TextFeatureCache
from trainer.evaluation.metrics import text_image_metrics
from trainer.model.medfinder import MedFinder
from trainer.model.text_encoders import build_text_encoder

logger = logging.getLogger(__name__)

BEST_METRIC = "val_t2i_R@10"


@dataclass
class TrainResult:
    """Where the checkpoints are and how the run ended."""

    out_dir: Path
    best_value: float
    best_epoch: int
    epochs_run: int
    seconds: float
    samples_per_second: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(settings: Settings) -> MedFinder:
    """MedFinder with its frozen text tower, as the settings describe it."""
    text_encoder = build_text_encoder(settings.model.text)
    return MedFinder(
        settings.model,
        settings.loss,
        settings.preprocessing.target_shape,
        text_encoder.feature_dim,
        text_encoder=text_encoder,
    )


def training_text(report: str, settings: Settings, rng: random.Random) -> str:
    """S(T, L) when the sampler is on; otherwise the whole report (the tokenizer truncates it)."""
    sampler = settings.model.sampler
    if sampler.enabled:
        return sample_window(report, sampler.window_words, rng, sampler.start_stride)
    return " ".join(report.split())


def validate(model: MedFinder, cache: TextFeatureCache, arrays: np.ndarray, reports: list[str],
             settings: Settings, device: torch.device) -> dict[str, Any]:
    """Text↔image recall on the validation gallery (deterministic text chunks)."""
    images = embed_volume_arrays(model, arrays, settings.eval.batch_size, device)
    texts = embed_reports(model, cache, reports, settings.model.sampler, device)
    return text_image_metrics(texts, images, settings.eval.recall_ks)


def train(settings: Settings, out_dir: Path, resume: bool = True) -> TrainResult:
    """Train, validate and checkpoint; ``resume`` continues from ``out_dir/last.pt`` when it exists."""
    context = init_distributed(settings.train.device)
    try:
        return _train(settings, Path(out_dir), resume, context)
    finally:
        shutdown_distributed()


def _train(settings: Settings, out_dir: Path, resume: bool, context: DistributedContext) -> TrainResult:
    if settings.train.num_threads:
        torch.set_num_threads(settings.train.num_threads)
    seed_everything(settings.train.seed + context.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = settings.train.progress and context.is_main
    policy = RowPolicy(settings.data.on_bad_row)
    splits = load_splits(settings, policy, progress=progress, context=context)
    train_set, val_set = splits.train, splits.val
    if len(train_set) < 2:
        raise ValueError(f"need at least 2 training volumes, got {len(train_set)} ({policy.summary()})")
    device = context.device
    model = build_model(settings).to(device)
    text_cache = TextFeatureCache(model.text_encoder)
    per_rank_batch = max(2, settings.train.batch_size // context.world_size)
    steps_per_epoch = max(1, len(train_set) // (per_rank_batch * context.world_size) // settings.train.grad_accum_steps)
    optimizer = build_optimizer(settings.optim, model.parameters())
    scheduler = build_scheduler(optimizer, settings.optim, steps_per_epoch, settings.train.epochs)
    use_amp = settings.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    wrapped: torch.nn.Module = model
    if context.enabled:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    start_epoch, global_step, best_value, best_epoch = 0, 0, -1.0, -1
    last_path = out_dir / "last.pt"
    if resume and last_path.exists():
        state = load_checkpoint(last_path)
        model.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best_value, best_epoch = state["best"]["value"], state["best"]["epoch"]
        logger.info("resumed from %s at epoch %d", last_path, start_epoch)

    augmenter = ViewAugmenter(settings.augment, seed=settings.train.seed * 1000 + context.rank)
    text_rng = random.Random(settings.train.seed * 7919 + context.rank)
    metrics_log = out_dir / "metrics.jsonl"
    started = time.time()
    samples_seen = 0
    epochs_run = 0
    description = {"data": splits.describe(), "skipped_rows": policy.summary()}

    for epoch in range(start_epoch, settings.train.epochs):
        epoch_started = time.time()
        model.train()
        order = np.random.default_rng([settings.train.seed, epoch]).permutation(len(train_set))
        usable = steps_per_epoch * settings.train.grad_accum_steps * per_rank_batch * context.world_size
        shard = order[:usable][context.rank :: context.world_size]
        totals: dict[str, float] = {}
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{settings.train.epochs}", disable=not progress, leave=False)
        for micro, start in enumerate(range(0, len(shard), per_rank_batch)):
            indices = np.sort(shard[start : start + per_rank_batch])
            volumes = torch.as_tensor(train_set.arrays[indices]).float()
            texts = [training_text(train_set.rows[i].report, settings, text_rng) for i in indices]
            features = text_cache.features(texts).to(device)
            view_1 = augmenter(volumes).to(device)
            view_2 = augmenter(volumes).to(device) if settings.augment.two_views else None
            sync = nullcontext() if not context.enabled or (micro + 1) % settings.train.grad_accum_steps == 0 else wrapped.no_sync()
            with sync, torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = wrapped(view_1, view_2, features)
                scaler.scale(losses["total"] / settings.train.grad_accum_steps).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            samples_seen += len(indices) * context.world_size
            if (micro + 1) % settings.train.grad_accum_steps == 0:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        bar.close()
        epochs_run += 1
        micro_steps = max(1, steps_per_epoch * settings.train.grad_accum_steps)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": scheduler.get_last_lr()[0],
            "loss": {k: v / micro_steps for k, v in totals.items()},
            "epoch_seconds": round(time.time() - epoch_started, 2),
        }
        out_of_time = settings.train.max_minutes is not None and (time.time() - started) / 60 > settings.train.max_minutes
        last_epoch = epoch + 1 == settings.train.epochs or out_of_time
        if context.is_main and ((epoch + 1) % settings.train.val_every_epochs == 0 or last_epoch):
            metrics = validate(model, text_cache, val_set.arrays, val_set.reports, settings, device) if len(val_set) else {}
            value = metrics["t2i"]["R@10"] if metrics else -float(record["loss"]["total"])
            record["val"] = {"t2i": _brief(metrics.get("t2i")), "i2t": _brief(metrics.get("i2t"))} if metrics else {}
            improved = value > best_value
            if improved:
                best_value, best_epoch = value, epoch + 1
            payload = {
                "model": model.trainable_state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "global_step": global_step,
                "settings": dump_settings(settings),
                "rng": capture_rng_state(),
                "best": {"metric": BEST_METRIC, "value": best_value, "epoch": best_epoch},
                "metrics": {"val": metrics},
                "text_encoder": {"kind": settings.model.text.kind, "name": model.text_encoder.name,
                                 "feature_dim": model.text_encoder.feature_dim},
                **description,
            }
            save_checkpoint(last_path, payload)
            if improved:
                save_checkpoint(out_dir / "best.pt", payload)
            record["best"] = {"metric": BEST_METRIC, "value": best_value, "epoch": best_epoch}
            with metrics_log.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            logger.info("epoch %d: %s", epoch + 1, json.dumps(record))
            if progress:
                tqdm.write(_summary_line(record))
        context.barrier()
        if out_of_time:
            logger.warning("train.max_minutes=%s reached after epoch %d: stopping", settings.train.max_minutes, epoch + 1)
            break

    seconds = time.time() - started
    return TrainResult(out_dir, best_value, best_epoch, epochs_run, seconds, samples_seen / max(seconds, 1e-9))


def _brief(metrics: dict[str, Any] | None) -> dict[str, float]:
    if not metrics:
        return {}
    return {k: round(float(metrics[k]), 3) for k in ("R@1", "R@5", "R@10", "MdR", "MnR") if k in metrics}


def _summary_line(record: dict[str, Any]) -> str:
    loss = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
    val = record.get("val", {}).get("t2i", {})
    shown = " ".join(f"{k}={v}" for k, v in val.items())
    return f"epoch {record['epoch']}: {loss} | val t2i {shown} | {record['epoch_seconds']}s"
