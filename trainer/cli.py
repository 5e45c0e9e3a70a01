"""Trainer subcommands: ``train``, ``evaluate``, ``evaluate-hybrid``, ``ablate``, ``label-bound``, ``data`` (manifest
builders, synthetic benchmark), and the bundle-making ``export``, ``import`` and ``bundle reference``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from config.arguments import add_config_arguments, settings_from_args
from trainer.evaluation.ablation import VARIANTS
from trainer.export import cli as export_cli
from trainer.importers import cli as importers_cli


def register(subparsers: argparse._SubParsersAction, bundle_actions: argparse._SubParsersAction) -> None:
    """Add the trainer's subcommands; ``export`` and ``bundle reference`` come from :mod:`trainer.export.cli`."""
    export_cli.register(subparsers, bundle_actions)
    importers_cli.register(subparsers)
    train = subparsers.add_parser("train", help="train MedFinder; writes OUT/best.pt, OUT/last.pt, OUT/metrics.jsonl")
    add_config_arguments(train)
    train.add_argument("--out", required=True, type=Path, help="run folder")
    train.add_argument("--no-resume", dest="resume", action="store_false", help="ignore OUT/last.pt and start over")
    train.add_argument("--evaluate", action="store_true", help="evaluate best.pt on the test split afterwards")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser("evaluate", help="retrieval metrics of a checkpoint (paper Tables 2 and 3)")
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--manifest", type=Path, help="evaluate on this manifest instead of the training one")
    evaluate.add_argument("--out", type=Path, help="JSON output (default: eval-SPLIT.json beside the checkpoint)")
    evaluate.add_argument("--no-baselines", dest="baselines", action="store_false")
    evaluate.set_defaults(handler=run_evaluate)

    hybrid = subparsers.add_parser(
        "evaluate-hybrid", help="text search over image vectors, reworded prior-report vectors and both fused (RRF)")
    hybrid.add_argument("--checkpoint", required=True, type=Path, help="defines the synthetic benchmark and split")
    hybrid.add_argument("--split", default="test", choices=("train", "val", "test"))
    hybrid.add_argument("--bundle", type=Path, help="embed with this exported bundle (onnxruntime, as served)")
    hybrid.add_argument("--rrf-k", type=int, help="RRF constant (default: the checkpoint's index.rrf_k)")
    hybrid.add_argument("--prefetch", type=int, help="fuse only each ranking's top N (default: the full rankings)")
    hybrid.add_argument("--out", type=Path, help="JSON output (default: hybrid-SPLIT[-bundle].json beside it)")
    hybrid.set_defaults(handler=run_evaluate_hybrid)

    ablate = subparsers.add_parser("ablate", help="train + evaluate with each branch switched off, side by side")
    add_config_arguments(ablate)
    ablate.add_argument("--out", required=True, type=Path, help="one sub-folder per variant")
    ablate.add_argument("--variants", nargs="+", default=["full", "no-sampler", "no-mse"],
                        help=f"from: {' '.join(VARIANTS)} (default: full no-sampler no-mse)")
    ablate.set_defaults(handler=run_ablate)

    bound = subparsers.add_parser(
        "label-bound", help="supervised reference: the image tower trained on the labels alone (per-label AUC, P@K)")
    add_config_arguments(bound)
    bound.add_argument("--out", type=Path, help="JSON output (optional)")
    bound.set_defaults(handler=run_label_bound)

    data = subparsers.add_parser("data", help="build manifests or the synthetic benchmark")
    kinds = data.add_subparsers(dest="kind", required=True, metavar="KIND")
    synthetic = kinds.add_parser("synthetic", help="generate the synthetic paired benchmark")
    add_config_arguments(synthetic)
    synthetic.add_argument("--out", type=Path, help="folder (default: <work_dir>/synthetic-<hash>)")
    synthetic.set_defaults(handler=run_synthetic)
    bimcvr = kinds.add_parser("bimcvr", help="manifest from a BIMCV-R release folder")
    bimcvr.add_argument("--root", required=True, type=Path)
    bimcvr.add_argument("--csv", type=Path)
    bimcvr.add_argument("--out", required=True, type=Path)
    bimcvr.set_defaults(handler=run_bimcvr)
    ctrate = kinds.add_parser("ctrate", help="manifest from CT-RATE volumes, reports and labels")
    ctrate.add_argument("--volumes", required=True, type=Path)
    ctrate.add_argument("--reports", required=True, type=Path)
    ctrate.add_argument("--labels", type=Path)
    ctrate.add_argument("--out", required=True, type=Path)
    ctrate.set_defaults(handler=run_ctrate)


def run_train(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from trainer.engine.loop import train

    result = train(settings, args.out, resume=args.resume)
    print(json.dumps({
        "out": str(result.out_dir), "best": {"metric": "val_t2i_R@10", "value": result.best_value, "epoch": result.best_epoch},
        "epochs_run": result.epochs_run, "minutes": round(result.seconds / 60, 2),
        "samples_per_second": round(result.samples_per_second, 2),
    }))
    if args.evaluate:
        from trainer.evaluation.evaluate import evaluate_checkpoint

        evaluate_checkpoint(args.out / "best.pt", split="test", progress=settings.train.progress)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluation.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, split=args.split, out=args.out, manifest=args.manifest, baselines=args.baselines)
    return 0


def run_evaluate_hybrid(args: argparse.Namespace) -> int:
    from trainer.evaluation.hybrid import evaluate_hybrid

    evaluate_hybrid(args.checkpoint, split=args.split, out=args.out, bundle=args.bundle, rrf_k=args.rrf_k,
                    prefetch=args.prefetch)
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from trainer.evaluation.ablation import run_ablation

    run_ablation(settings_from_args(args), args.out, args.variants)
    return 0


def run_label_bound(args: argparse.Namespace) -> int:
    from trainer.evaluation.label_bound import format_label_bound, run_label_bound

    settings = settings_from_args(args)
    print(format_label_bound(run_label_bound(settings, args.out, progress=settings.train.progress)))
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from trainer.data.sources import generate_synthetic, synthetic_dir

    settings = settings_from_args(args)
    print(generate_synthetic(settings, args.out or synthetic_dir(settings)))
    return 0


def run_bimcvr(args: argparse.Namespace) -> int:
    from trainer.data.builders import build_bimcvr_manifest, write_built_manifest

    print(write_built_manifest(build_bimcvr_manifest(args.root, args.csv), args.out))
    return 0


def run_ctrate(args: argparse.Namespace) -> int:
    from trainer.data.builders import build_ctrate_manifest, write_built_manifest

    print(write_built_manifest(build_ctrate_manifest(args.volumes, args.reports, args.labels), args.out))
    return 0
