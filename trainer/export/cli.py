"""``medfinder export`` and ``medfinder bundle reference``: the torch side of making a model bundle.

Registered by ``trainer.cli``; ``bundle reference`` joins the torch-free ``bundle`` actions of
``model_export.cli``. torch is imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from config.arguments import add_config_arguments, settings_from_args
from model_export.cli import fail, registry_settings
from trainer.export.reference import REFERENCE_PRESET


def register(subparsers: argparse._SubParsersAction, bundle_actions: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser("export", help="checkpoint -> ONNX model bundle folder, parity-checked")
    add_config_arguments(export)  # only paths.* matter: the checkpoint carries the model settings
    export.add_argument("--checkpoint", required=True, type=Path, help="best.pt / last.pt of a training run")
    export.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    export.add_argument("--name", help="model name in the manifest (default medfinder-<backbone>-<text tower>)")
    export.add_argument("--version", help="model version in the manifest (default epoch<N>)")
    export.add_argument("--parity-series", type=Path,
                        help="DICOM series for the real-data parity check (default: first Lung-PET-CT-Dx series "
                             "under paths.shared_data)")
    export.add_argument("--threads", type=int, help="torch and onnxruntime threads during export")
    export.add_argument("--force", action="store_true", help="replace an existing --out folder")
    export.set_defaults(handler=run_export)

    reference = bundle_actions.add_parser(
        "reference", help="train (synthetic-cpu preset), export, install and activate the demo bundle")
    reference.add_argument("--checkpoint", type=Path, help="install from this checkpoint instead of training")
    reference.add_argument("--run-dir", type=Path, help="training run folder (default <work_dir>/synthetic-cpu)")
    reference.add_argument("--if-missing", action="store_true",
                           help="do nothing when a bundle is already active (what `make run` uses)")
    add_config_arguments(reference)
    reference.add_argument("--data-dir", type=Path, help="override paths.data_dir (the registry is DATA_DIR/bundles)")
    reference.set_defaults(config=REFERENCE_PRESET, handler=run_bundle_reference)


def run_export(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from trainer.export.bundle_export import export_bundle
    from trainer.export.parity import find_real_series

    settings = settings_from_args(args)
    series = args.parity_series or find_real_series(settings.paths.shared_data)
    if series is None:
        print(f"medfinder export: no real CT series under {settings.paths.shared_data}: parity on random volumes "
              "and texts only", file=sys.stderr)
    try:
        manifest = export_bundle(args.checkpoint, args.out, real_series=series, name=args.name,
                                 version=args.version, force=args.force, threads=args.threads,
                                 report=lambda line: print(f"export: {line}", flush=True))
    except (BundleError, FileNotFoundError, ValueError) as error:
        return fail("export", error)
    parity = manifest.parity or {}
    print(json.dumps({"out": str(args.out), "bundle_id": manifest.bundle_id,
                      "embedding_dim": manifest.embedding_dim,
                      "parity": {"min_cosine": parity["min_cosine"], "max_abs_diff": parity["max_abs_diff"],
                                 "real_series": parity["real_series"]}}, indent=2))
    return 0


def run_bundle_reference(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from model_export.registry import active_bundle_id
    from trainer.export.reference import build_reference_bundle

    settings = registry_settings(args)
    if args.if_missing:
        active = active_bundle_id(settings)
        if active is not None:
            print(f"bundle {active} is active: nothing to build")
            return 0
    try:
        path = build_reference_bundle(settings, checkpoint=args.checkpoint, run_dir=args.run_dir,
                                      report=lambda line: print(line, flush=True))
    except (BundleError, FileNotFoundError) as error:
        return fail("bundle reference", error)
    print(f"reference bundle: {path.name} (active) in {path.parent}")
    print("note: a demo trained on synthetic findings; not a clinical model (see README, Model bundles)")
    return 0
