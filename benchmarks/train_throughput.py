"""Training throughput (samples/s) and peak memory of one MedFinder step, per preset.

Each measurement runs in its own subprocess so that peak RSS (``ru_maxrss``) belongs to it alone.
A step is the full objective as the preset configures it: two augmented views, token fusion,
L_mse + L_sim, backward, optimiser step. Text features come from the frozen tower's cache in real
runs, so they are random here, and the frozen text tower is timed on its own. The reference in the
same run is the plain single-view CLIP step (fusion and L_mse off) on the same backbone and input, so
the ratio is the cost of MedFinder's objective.

    python -m benchmarks.train_throughput [--steps N] [--paper] [--paper-batch B]

``--paper`` adds the paper preset (3D ResNet-50, 96x224x224): minutes per step on a CPU, meant for a
GPU machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

TEXT_FEATURE_DIM = 384  # all-MiniLM-L6-v2; the paper's BiomedCLIP gives 512, which changes nothing here


def run_step_benchmark(preset: str, batch: int, steps: int, medfinder_objective: bool) -> dict[str, Any]:
    """Time ``steps`` training steps after one warm-up step (runs in the child process)."""
    import torch

    from config import load_settings
    from trainer.data.augment import ViewAugmenter
    from trainer.engine.optim import build_optimizer
    from trainer.model.medfinder import MedFinder

    base = load_settings(preset)
    torch.set_num_threads(base.train.num_threads or 2)
    overrides = {} if medfinder_objective else {
        "model": {"fusion": False}, "loss": {"mse": False}, "augment": {"two_views": False}}
    settings = load_settings(preset, overrides=overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = settings.preprocessing.target_shape
    model = MedFinder(settings.model, settings.loss, shape, text_feature_dim=TEXT_FEATURE_DIM).to(device)
    optimizer = build_optimizer(settings.optim, model.parameters())
    augmenter = ViewAugmenter(settings.augment, seed=0)
    volumes = torch.rand(batch, 1, *shape)
    features = torch.randn(batch, TEXT_FEATURE_DIM, device=device)
    use_amp = settings.train.amp and device.type == "cuda"

    def step() -> None:
        view_1 = augmenter(volumes).to(device)
        view_2 = augmenter(volumes).to(device) if settings.augment.two_views else None
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            losses = model.training_losses(view_1, view_2, features)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "samples_per_second": steps * batch / seconds,
        "seconds_per_step": seconds / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "device": str(device),
    }


def run_text_benchmark(reports: int = 64) -> dict[str, Any]:
    """Frozen all-MiniLM-L6-v2 on ~100-word texts: what a feature-cache miss costs (child process)."""
    import torch

    from config.settings import TextEncoderSettings
    from trainer.model.text_encoders import build_text_encoder

    torch.set_num_threads(2)
    encoder = build_text_encoder(TextEncoderSettings(kind="minilm"))
    words = ("the lungs show a small nodule in the right upper lobe without pleural effusion or "
             "consolidation and the heart size is normal there is no lymphadenopathy ").split()
    texts = [" ".join((words[i % 9:] + words * 6)[:100]) for i in range(reports)]
    encoder.encode(texts[:4])
    started = time.perf_counter()
    encoder.encode(texts, batch_size=32)
    seconds = time.perf_counter() - started
    return {"reports_per_second": reports / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_subprocess(*args: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--child", *args],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--paper", action="store_true", help="also the paper preset (ResNet-50, 96x224x224)")
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "text":
            result = run_text_benchmark()
        else:
            result = run_step_benchmark(rest[0], int(rest[1]), int(rest[2]), rest[3] == "1")
        print(json.dumps(result))
        return 0

    from config import load_settings

    runs = [("synthetic-cpu", load_settings("synthetic-cpu").train.batch_size, args.steps)]
    if args.paper:
        runs.append(("paper", args.paper_batch, 1))
    print("MedFinder training step: full objective (2 views, fusion, L_mse + L_sim) vs plain single-view CLIP step")
    print(f"{'preset':14} {'batch':>5} {'objective':>10} {'samples/s':>10} {'s/step':>8} {'peak MB':>8} {'ratio':>6}  device")
    for preset, batch, steps in runs:
        full = in_subprocess("step", preset, str(batch), str(steps), "1")
        plain = in_subprocess("step", preset, str(batch), str(steps), "0")
        for label, result in (("MedFinder", full), ("plain", plain)):
            ratio = result["samples_per_second"] / plain["samples_per_second"]
            memory = result["peak_gpu_mb"] or result["peak_rss_mb"]
            print(f"{preset:14} {batch:5d} {label:>10} {result['samples_per_second']:10.2f} "
                  f"{result['seconds_per_step']:8.3f} {memory:8.0f} {ratio:6.2f}  {result['device']}")
    text = in_subprocess("text")
    print(f"frozen all-MiniLM-L6-v2, 100-word reports: {text['reports_per_second']:.1f} reports/s "
          f"(peak RSS {text['peak_rss_mb']:.0f} MB); training caches features by text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
