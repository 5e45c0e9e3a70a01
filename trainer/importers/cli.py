"""``medfinder import colipri``: a pretrained encoder from local files -> a model bundle folder.

Registered by ``trainer.cli``; torch and the importer are imported inside the handler only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from config.arguments import add_config_arguments, settings_from_args
from model_export.cli import fail


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``import`` with its one source so far, ``colipri``."""
    importer = subparsers.add_parser("import", help="a pretrained encoder (local weights) -> ONNX model bundle")
    sources = importer.add_subparsers(dest="source", required=True, metavar="SOURCE")
    colipri = sources.add_parser(
        "colipri", help="COLIPRI (microsoft/colipri, chest CT + reports, MIT) from a local weights folder")
    add_config_arguments(colipri)  # paths.shared_data for the default parity series
    colipri.add_argument("--weights", required=True, type=Path,
                         help="folder with model.safetensors (microsoft/colipri) and BiomedVLP-CXR-BERT-specialized/")
    colipri.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    colipri.add_argument("--input-size", type=int,
                         help="cube edge in voxels at 2 mm, a multiple of 8 (default: COLIPRI's config, 192)")
    colipri.add_argument("--text-tower", type=Path,
                         help="CXR-BERT folder (default: WEIGHTS/BiomedVLP-CXR-BERT-specialized)")
    colipri.add_argument("--orientation", choices=("RAS", "SAR"),
                         help="array orientation fed to Primus (default: the installed colipri's config; 0.1.3: RAS)")
    colipri.add_argument("--name", help="model name in the manifest (default colipri)")
    colipri.add_argument("--version", help="model version in the manifest (default colipri-crm-<input size>)")
    colipri.add_argument("--parity-series", type=Path,
                         help="DICOM series for the real-data parity check (default: first Lung-PET-CT-Dx series "
                              "under paths.shared_data)")
    colipri.add_argument("--threads", type=int, help="torch and onnxruntime threads during the import")
    colipri.add_argument("--force", action="store_true", help="replace an existing --out folder")
    colipri.set_defaults(handler=run_import_colipri)


def run_import_colipri(args: argparse.Namespace) -> int:
    from model_export.errors import BundleError
    from trainer.export.parity import find_real_series
    from trainer.importers.colipri_bundle import import_colipri
    from trainer.importers.colipri_model import ColipriImportError

    settings = settings_from_args(args)
    series = args.parity_series or find_real_series(settings.paths.shared_data)
    if series is None:
        print(f"medfinder import: no real CT series under {settings.paths.shared_data}: parity on random volumes "
              "and texts only", file=sys.stderr)
    try:
        manifest = import_colipri(args.weights, args.out, text_tower=args.text_tower, input_size=args.input_size,
                                  orientation=args.orientation, real_series=series, name=args.name,
                                  version=args.version, force=args.force, threads=args.threads,
                                  report=lambda line: print(f"import: {line}", flush=True))
    except (BundleError, ColipriImportError, FileNotFoundError) as error:
        return fail("import colipri", error)
    parity = manifest.parity or {}
    print(json.dumps({"out": str(args.out), "bundle_id": manifest.bundle_id, "embedding_dim": manifest.embedding_dim,
                      "parity": {"min_cosine": parity["min_cosine"], "max_abs_diff": parity["max_abs_diff"],
                                 "real_series": parity["real_series"],
                                 "preprocessing_vs_torchio": parity["preprocessing_vs_torchio"]}}, indent=2))
    return 0
