"""``medfinder bundle reference``: the demo model that makes a fresh install work end to end.

It is MedFinder trained on the *synthetic* benchmark (generated findings on public CT backgrounds) with the
``synthetic-cpu`` preset: a demonstration of the pipeline, not a clinical model. It stands for a chest CT model,
so its manifest's ``domain`` says chest CT (``data.body_regions``, default CHEST): the node embeds no other region.
Steps, each skipped when already done: train and evaluate exactly as
``medfinder train --config synthetic-cpu --out DIR --evaluate`` (a run folder holding ``best.pt`` and ``eval-test.json`` is complete), export + parity check, install into the
registry, activate. ``checkpoint=`` skips training and installs from an existing checkpoint instead.
Deterministic by seed (the preset's ``train.seed``; its ``train.max_minutes`` cap can end training earlier on a
slower machine).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from config import Settings
from model_export.bundle_manifest import sha256_file
from model_export.registry import (
    activate_bundle,
    active_bundle_id,
    install_bundle,
    installed_from_checkpoint,
    registry_dir,
)

REFERENCE_PRESET = "synthetic-cpu"
REFERENCE_NAME = "medfinder-synthetic-cpu-demo"
REFERENCE_RUN = "synthetic-cpu"  # <work_dir>/synthetic-cpu, the folder `make run` trains into

Reporter = Callable[[str], None]


def ensure_trained(settings: Settings, run_dir: Path, report: Reporter) -> Path:
    """``run_dir/best.pt``, training and evaluating first unless the run folder is complete."""
    checkpoint, evaluation = run_dir / "best.pt", run_dir / "eval-test.json"
    if checkpoint.is_file() and evaluation.is_file():
        report(f"[1/3] {run_dir} already holds a trained and evaluated checkpoint: no training")
        return checkpoint
    from trainer.evaluation.evaluate import train_and_evaluate

    report(f"[1/3] training MedFinder on the synthetic benchmark into {run_dir} (resumes from last.pt if present), "
           "then evaluating it on the test split")
    result, _ = train_and_evaluate(settings, run_dir, resume=True)
    report(f"      trained {result.epochs_run} epoch(s) in {result.seconds / 60:.1f} min; best val t2i R@10 "
           f"{result.best_value:.1f} (epoch {result.best_epoch})")
    return checkpoint


def build_reference_bundle(
    settings: Settings,
    checkpoint: Path | None = None,
    run_dir: Path | None = None,
    report: Reporter = print,
) -> Path:
    """Install (and activate) the reference bundle; returns its folder in the registry."""
    if checkpoint is None:
        checkpoint = ensure_trained(settings, Path(run_dir or Path(settings.paths.work_dir) / REFERENCE_RUN), report)
    else:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        report(f"[1/3] using {checkpoint}: no training")

    existing = installed_from_checkpoint(settings, sha256_file(checkpoint), name=REFERENCE_NAME)
    if existing is not None:
        if active_bundle_id(settings) == existing.name:
            report(f"[2/3] bundle {existing.name} from this checkpoint is installed and active: nothing to do")
        else:
            activate_bundle(settings, existing.name)
            report(f"[2/3] bundle {existing.name} from this checkpoint was installed: activated it")
        return existing

    from trainer.export.bundle_export import export_bundle
    from trainer.export.parity import find_real_series

    report("[2/3] exporting the ONNX bundle and checking parity")
    staging = registry_dir(settings) / f".reference-export-{os.getpid()}"
    try:
        export_bundle(checkpoint, staging, real_series=find_real_series(settings.paths.shared_data),
                      name=REFERENCE_NAME, force=True, threads=settings.train.num_threads,
                      report=lambda line: report(f"      {line}"))
        path = install_bundle(staging, settings, activate=True, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report(f"[3/3] installed {path} and marked it active")
    return path
