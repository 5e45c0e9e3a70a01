"""Training throughput (samples/s) and peak memory of one MedFinder step, per configuration.

Each configuration runs in its own subprocess so that peak RSS (``ru_maxrss``) belongs to it alone.
A step is the full objective: two augmented views, token fusion, L_mse + L_sim, backward, optimiser
step; text features come from the frozen tower's cache in real runs, so they are random here and the
frozen text tower is timed on its own. The reference in the same run is the plain single-view CLIP
step (fusion and L_mse off) on the same backbone, so the ratio is the cost of MedFinder's objective.

    python -m benchmarks.train_throughput [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "synthetic-cpu (resnet10/16, 32x64x64, b32)": {
        "image": {"backbone": "resnet10", "widths": [16, 32, 64, 128], "conv1_kernel": 5, "conv1_stride": 2,
                  "max_pool": False},
        "shape": [32, 64, 64], "batch": 32,
    },
    "resnet18/32, 48x96x96, b8": {
        "image": {"backbone": "resnet18", "widths": [32, 64, 128, 256], "conv1_kernel": 7, "conv1_stride": 2},
        "shape": [48, 96, 96], "batch": 8,
    },
    "paper resnet50, 96x224x224, b2": {"image": {"backbone": "resnet50"}, "shape": [96, 224, 224], "batch": 2},
}


def run_one(name: str, steps: int, medfinder_objective: bool) -> dict[str, Any]:
    """Time ``steps`` training steps after one warm-up step (runs in the child process)."""
    import torch

    from config import load_settings
    from trainer.data.augment import ViewAugmenter
    from trainer.engine.optim import build_optimizer
    from trainer.model.medfinder import MedFinder

    torch.set_num_threads(2)
    config = CONFIGS[name]
    settings = load_settings(overrides={
        "model": {"image": config["image"], "fusion": medfinder_objective, "embedding_dim": 256},
        "loss": {"mse": medfinder_objective},
        "augment": {"two_views": medfinder_objective},
    })
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = MedFinder(settings.model, settings.loss, tuple(config["shape"]), text_feature_dim=384).to(device)
    optimizer = build_optimizer(settings.optim, model.parameters())
    augmenter = ViewAugmenter(settings.augment, seed=0)
    batch = config["batch"]
    volumes = torch.rand(batch, 1, *config["shape"])
    features = torch.randn(batch, 384, device=device)

    def step() -> None:
        view_1 = augmenter(volumes).to(device)
        view_2 = augmenter(volumes).to(device) if medfinder_objective else None
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
        "device": str(device),
    }


def time_text_tower(reports: int = 64) -> dict[str, Any]:
    """Frozen all-MiniLM-L6-v2 on ~100-word texts: the cost a feature-cache miss pays (child process)."""
    import torch

    from config.settings import TextEncoderSettings
    from trainer.model.text_encoders import build_text_encoder

    torch.set_num_threads(2)
    encoder = build_text_encoder(TextEncoderSettings(kind="minilm"))
    words = ("the lungs show a small nodule in the right upper lobe without pleural effusion or "
             "consolidation and the heart size is normal ").split()
    texts = [" ".join(words[(i % 7):] + words) [: 700] for i in range(reports)]
    encoder.encode(texts[:4])
    started = time.perf_counter()
    encoder.encode(texts, batch_size=32)
    seconds = time.perf_counter() - started
    return {"reports_per_second": reports / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_subprocess(kind: str, *args: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--child", kind, *args],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="skip the paper-sized ResNet-50")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = time_text_tower() if kind == "text" else run_one(rest[0], int(rest[1]), rest[2] == "1")
        print(json.dumps(result))
        return 0

    print("MedFinder training step on CPU (2 threads): full objective vs plain single-view CLIP step")
    print(f"{'configuration':46} {'objective':>10} {'samples/s':>10} {'s/step':>8} {'peak MB':>8} {'ratio':>6}")
    for name in CONFIGS:
        if args.quick and "resnet50" in name:
            continue
        steps = str(1 if "resnet50" in name else args.steps)
        full = in_subprocess("step", name, steps, "1")
        plain = in_subprocess("step", name, steps, "0")
        for label, result in (("MedFinder", full), ("plain", plain)):
            ratio = result["samples_per_second"] / plain["samples_per_second"]
            print(f"{name:46} {label:>10} {result['samples_per_second']:10.2f} {result['seconds_per_step']:8.2f} "
                  f"{result['peak_rss_mb']:8.0f} {ratio:6.2f}")
    text = in_subprocess("text")
    print(f"frozen all-MiniLM-L6-v2, ~100-word reports: {text['reports_per_second']:.1f} reports/s "
          f"(peak {text['peak_rss_mb']:.0f} MB); cached after first use during training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
