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
from trainer.data.manifest import label_matrix
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


def build_model(settings: Settings, text_encoder: torch.nn.Module | None = None) -> MedFinder:
    """MedFinder with its frozen text tower (built from the settings unless an already loaded one is given)."""
    text_encoder = text_encoder if text_encoder is not None else build_text_encoder(settings.model.text)
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


def load_trained_model(checkpoint: Path) -> tuple[MedFinder, dict[str, Any], Settings]:
    """A checkpoint's model in eval mode on the CPU (frozen text tower rebuilt from its settings), its raw state
    and its settings: the one way evaluation and export read a training run."""
    state = load_checkpoint(checkpoint)
    settings = Settings.model_validate(state["settings"])
    model = build_model(settings)
    model.load_trainable_state_dict(state["model"])
    return model.eval(), state, settings


def train(settings: Settings, out_dir: Path, resume: bool = True) -> TrainResult:
    """Train, validate and checkpoint; ``resume`` continues from ``out_dir/last.pt`` when it exists."""
    context = init_distributed(settings.train.device)
    try:
        return _train(settings, Path(out_dir), resume, context)
    finally:
        shutdown_distributed()


class TrainingRun:
    """The state of one training run and its three moves: resume, run an epoch, validate + checkpoint."""

    def __init__(self, settings: Settings, out_dir: Path, context: DistributedContext) -> None:
        self.settings, self.out_dir, self.context = settings, out_dir, context
        self.progress = settings.train.progress and context.is_main
        self.policy = RowPolicy(settings.data.on_bad_row)
        self.splits = load_splits(settings, self.policy, progress=self.progress, context=context)
        if len(self.splits.train) < 2:
            raise ValueError(f"need at least 2 training volumes, got {len(self.splits.train)} ({self.policy.summary()})")
        self.device = context.device
        # the auxiliary label loss's targets, once (None when it is off)
        self.train_labels = label_matrix(self.splits.train.rows, settings.loss.label_names) \
            if settings.loss.label_weight > 0 else None
        self.model = build_model(settings).to(self.device)
        self.text_cache = TextFeatureCache(self.model.text_encoder)
        train = settings.train
        self.per_rank_batch = max(2, train.batch_size // context.world_size)
        samples_per_step = self.per_rank_batch * context.world_size * train.grad_accum_steps
        self.steps_per_epoch = max(1, len(self.splits.train) // samples_per_step)
        self.optimizer = build_optimizer(settings.optim, self.model.parameters())
        self.scheduler = build_scheduler(self.optimizer, settings.optim, self.steps_per_epoch, train.epochs)
        self.use_amp = train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.wrapped: torch.nn.Module = self.model
        if context.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.augmenter = ViewAugmenter(settings.augment, seed=train.seed * 1000 + context.rank)
        self.text_rng = random.Random(train.seed * 7919 + context.rank)
        self.start_epoch, self.global_step = 0, 0
        self.best_value, self.best_epoch = -float("inf"), -1
        self.samples_seen = 0

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    def resume(self) -> None:
        """Continue from ``last.pt``: weights, optimiser, schedule, scaler, step and every RNG."""
        state = load_checkpoint(self.last_path)
        self.model.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.augmenter.rng.bit_generator.state = state["rng"]["augment"]
        self.text_rng.setstate(state["rng"]["text_sampler"])
        self.start_epoch, self.global_step = state["epoch"] + 1, state["global_step"]
        self.best_value, self.best_epoch = state["best"]["value"], state["best"]["epoch"]
        logger.info("resumed from %s at epoch %d", self.last_path, self.start_epoch + 1)

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this rank's shard of a seeded permutation; returns the mean losses."""
        settings, context = self.settings, self.context
        accumulate = settings.train.grad_accum_steps
        train_set = self.splits.train
        self.model.train()
        order = np.random.default_rng([settings.train.seed, epoch]).permutation(len(train_set))
        usable = self.steps_per_epoch * accumulate * self.per_rank_batch * context.world_size
        shard = order[:usable][context.rank :: context.world_size]
        totals: dict[str, float] = {}
        description = f"epoch {epoch + 1}/{settings.train.epochs}"
        bar = tqdm(total=self.steps_per_epoch, desc=description, disable=not self.progress, leave=False)
        for micro, start in enumerate(range(0, len(shard), self.per_rank_batch)):
            indices = np.sort(shard[start : start + self.per_rank_batch])
            volumes = torch.as_tensor(train_set.arrays[indices]).float()
            texts = [training_text(train_set.rows[i].report, settings, self.text_rng) for i in indices]
            features = self.text_cache.features(texts).to(self.device)
            labels = None if self.train_labels is None else torch.as_tensor(self.train_labels[indices]).to(self.device)
            view_1 = self.augmenter(volumes).to(self.device)
            view_2 = self.augmenter(volumes).to(self.device) if settings.augment.two_views else None
            stepping = (micro + 1) % accumulate == 0
            sync = nullcontext() if not context.enabled or stepping else self.wrapped.no_sync()
            with sync, torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                losses = self.wrapped(view_1, view_2, features, labels)
                self.scaler.scale(losses["total"] / accumulate).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach())
            self.samples_seen += len(indices) * context.world_size
            if stepping:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}")
        bar.close()
        micro_steps = max(1, self.steps_per_epoch * accumulate)
        return {name: total / micro_steps for name, total in totals.items()}

    def validate_and_checkpoint(self, epoch: int, record: dict[str, Any]) -> None:
        """Validation recall, ``last.pt`` (and ``best.pt`` on improvement), one ``metrics.jsonl`` line."""
        val_set = self.splits.val
        metrics = validate(self.model, self.text_cache, val_set.arrays, val_set.reports, self.settings, self.device) \
            if len(val_set) else {}
        value = metrics["t2i"]["R@10"] if metrics else -float(record["loss"]["total"])
        record["val"] = {"t2i": _brief(metrics.get("t2i")), "i2t": _brief(metrics.get("i2t"))} if metrics else {}
        improved = value > self.best_value
        if improved:
            self.best_value, self.best_epoch = value, epoch + 1
        best = {"metric": BEST_METRIC, "value": self.best_value, "epoch": self.best_epoch}
        rng = capture_rng_state()
        rng.update(augment=self.augmenter.rng.bit_generator.state, text_sampler=self.text_rng.getstate())
        encoder = self.model.text_encoder
        payload = {
            "model": self.model.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "settings": dump_settings(self.settings),
            "rng": rng,
            "best": best,
            "metrics": {"val": metrics},
            "text_encoder": {"kind": self.settings.model.text.kind, "name": encoder.name, "feature_dim": encoder.feature_dim},
            "data": self.splits.describe(),
            "skipped_rows": self.policy.summary(),
        }
        save_checkpoint(self.last_path, payload)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", payload)
        record["best"] = best
        with (self.out_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info("epoch %d: %s", epoch + 1, json.dumps(record))
        if self.progress:
            tqdm.write(_summary_line(record))


def _train(settings: Settings, out_dir: Path, resume: bool, context: DistributedContext) -> TrainResult:
    if settings.train.num_threads:
        torch.set_num_threads(settings.train.num_threads)
    seed_everything(settings.train.seed + context.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = TrainingRun(settings, out_dir, context)
    if resume and run.last_path.exists():
        run.resume()
    started = time.time()
    epochs_run = 0
    validation_seconds = 0.0
    for epoch in range(run.start_epoch, settings.train.epochs):
        epoch_started = time.time()
        losses = run.run_epoch(epoch)
        epochs_run += 1
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": run.global_step,
            "lr": run.scheduler.get_last_lr()[0],
            "loss": losses,
            "epoch_seconds": round(time.time() - epoch_started, 2),
        }
        # still to come if we go on: this epoch's validation, then one more epoch and its validation
        estimate = record["epoch_seconds"] + 2 * validation_seconds
        out_of_time = _next_epoch_overruns(settings.train.max_minutes, time.time() - started, estimate)
        last_epoch = epoch + 1 == settings.train.epochs or out_of_time
        if context.is_main and ((epoch + 1) % settings.train.val_every_epochs == 0 or last_epoch):
            validation_started = time.time()
            run.validate_and_checkpoint(epoch, record)
            validation_seconds = time.time() - validation_started
        context.barrier()
        if out_of_time and epoch + 1 < settings.train.epochs:
            logger.warning("train.max_minutes=%s: another epoch would not fit after epoch %d; stopping",
                           settings.train.max_minutes, epoch + 1)
            break
    seconds = time.time() - started
    return TrainResult(out_dir, run.best_value, run.best_epoch, epochs_run, seconds, run.samples_seen / max(seconds, 1e-9))


def _next_epoch_overruns(limit_minutes: float | None, elapsed_s: float, last_epoch_s: float) -> bool:
    """Whether one more epoch, as long as the last one, would end past ``limit_minutes``.

    Why predict instead of checking the elapsed time alone: stopping only once the limit has passed lets
    the run overrun by up to a whole epoch, and a time-boxed run (the 15-minute CPU benchmark) must not.
    """
    return limit_minutes is not None and (elapsed_s + last_epoch_s) / 60.0 > limit_minutes


def _brief(metrics: dict[str, Any] | None) -> dict[str, float]:
    if not metrics:
        return {}
    return {k: round(float(metrics[k]), 3) for k in ("R@1", "R@5", "R@10", "MdR", "MnR") if k in metrics}


def _summary_line(record: dict[str, Any]) -> str:
    loss = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
    val = record.get("val", {}).get("t2i", {})
    shown = " ".join(f"{k}={v}" for k, v in val.items())
    return f"epoch {record['epoch']}: {loss} | val t2i {shown} | {record['epoch_seconds']}s"
