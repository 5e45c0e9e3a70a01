"""Subcommands of the bundle contract, all torch-free.

``preprocess`` (one volume through the shared recipe) and ``bundle list | verify | activate | install`` (the
registry). Making bundles (``export``, ``bundle reference``) is the trainer's: see ``trainer.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from config.arguments import add_config_arguments, settings_from_args
from config.settings import Settings


def register(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``preprocess`` and ``bundle``; returns ``bundle``'s actions so the trainer can add ``reference``."""
    preprocess = subparsers.add_parser(
        "preprocess", help="run a DICOM series folder or NIfTI file through the shared preprocessing"
    )
    add_config_arguments(preprocess)
    preprocess.add_argument("source", type=Path, help="DICOM series folder, .nii/.nii.gz or .npy")
    preprocess.add_argument("--out", type=Path, help="write the model input [1, D, H, W] as .npy")
    preprocess.set_defaults(handler=run_preprocess)

    bundle = subparsers.add_parser("bundle", help="model bundle registry: list, verify, activate, install, reference")
    actions = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="installed bundles, the active one marked *")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    verify = actions.add_parser("verify", help="check every file of a bundle folder against its manifest")
    verify.add_argument("path", type=Path, help="bundle folder (or the id of an installed bundle)")
    activate = actions.add_parser("activate", help="mark an installed bundle active")
    activate.add_argument("bundle_id", help="bundle id (a unique prefix is enough)")
    install = actions.add_parser("install", help="copy a bundle folder into the registry")
    install.add_argument("path", type=Path)
    install.add_argument("--activate", action="store_true")
    for parser, handler in ((listing, run_bundle_list), (verify, run_bundle_verify), (activate, run_bundle_activate),
                            (install, run_bundle_install)):
        add_config_arguments(parser)
        parser.add_argument("--data-dir", type=Path, help="override paths.data_dir (the registry is DATA_DIR/bundles)")
        parser.set_defaults(handler=handler)
    return actions


def fail(command: str, error: Exception) -> int:
    print(f"medfinder {command}: {error}", file=sys.stderr)
    return 1


def registry_settings(args: argparse.Namespace) -> Settings:
    settings = settings_from_args(args)
    if getattr(args, "data_dir", None) is not None:
        settings.paths.data_dir = args.data_dir
    return settings


def run_preprocess(args: argparse.Namespace) -> int:
    import numpy as np

    from model_export.preprocessing import VolumeError, describe_spec, load_volume, preprocess_volume

    settings = settings_from_args(args)
    try:
        volume = load_volume(args.source)
        array = preprocess_volume(volume, settings.preprocessing)
    except VolumeError as exc:
        print(f"medfinder preprocess: {exc}")
        return 1
    if args.out is not None:
        np.save(args.out, array)
    summary = {
        "source_shape_ijk": list(volume.shape),
        "source_spacing_mm": [round(float(s), 4) for s in volume.spacing],
        "input_shape": list(array.shape),
        "value_range": [float(array.min()), float(array.max())],
        "recipe": describe_spec(settings.preprocessing),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _metric_text(metrics: dict) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k} {metrics[k]:.1f}" for k in ("R@1", "R@5", "R@10") if k in metrics) + f" ({metrics['split']})"


def run_bundle_list(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from model_export.registry import list_bundles, registry_dir

    settings = registry_settings(args)
    try:
        entries = list_bundles(settings)
    except BundleError as error:
        return fail("bundle list", error)
    if args.json:
        print(json.dumps([{"bundle_id": e.bundle_id, "active": e.active, "name": e.name, "version": e.version,
                           "embedding_dim": e.embedding_dim, "created": e.created, "t2i": e.headline_metrics(),
                           "path": str(e.path), "error": e.error} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no bundles in {registry_dir(settings)} (install one: medfinder bundle reference)")
        return 0
    print(f"bundles in {registry_dir(settings)} (* = active)")
    print(f"  {'bundle id':16}  {'model':30} {'version':10} {'dim':>4}  {'created':25}  text→image")
    for e in entries:
        marker = "*" if e.active else " "
        if e.error:
            print(f"{marker} {e.bundle_id:16}  unreadable: {e.error}")
            continue
        print(f"{marker} {e.bundle_id:16}  {e.name:30} {e.version:10} {e.embedding_dim or '?':>4}  {e.created:25}  "
              f"{_metric_text(e.headline_metrics())}")
    return 0


def run_bundle_verify(args: argparse.Namespace) -> int:
    from model_export.bundle_manifest import verify_bundle
    from model_export.errors import BundleError
    from model_export.registry import find_bundle

    try:
        folder = args.path
        if not folder.exists() and len(folder.parts) == 1:
            folder = find_bundle(registry_settings(args), str(folder))
        manifest = verify_bundle(folder)
    except BundleError as error:
        return fail("bundle verify", error)
    print(f"ok: bundle {manifest.bundle_id} ({manifest.model.name} {manifest.model.version}, "
          f"{len(manifest.files)} files + manifest, {manifest.embedding_dim}-d) at {folder}")
    return 0


def run_bundle_activate(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from model_export.registry import activate_bundle

    try:
        bundle_id = activate_bundle(registry_settings(args), args.bundle_id)
    except BundleError as error:
        return fail("bundle activate", error)
    print(f"active bundle: {bundle_id}")
    return 0


def run_bundle_install(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from model_export.registry import install_bundle

    try:
        path = install_bundle(args.path, registry_settings(args), activate=args.activate)
    except BundleError as error:
        return fail("bundle install", error)
    print(f"installed {path}" + (" (active)" if args.activate else ""))
    return 0
