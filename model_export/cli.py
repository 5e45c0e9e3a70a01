"""Torch-free subcommands of the bundle contract: ``preprocess`` (one volume through the shared recipe)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from config.cli import add_config_arguments, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    preprocess = subparsers.add_parser(
        "preprocess", help="run a DICOM series folder or NIfTI file through the shared preprocessing"
    )
    add_config_arguments(preprocess)
    preprocess.add_argument("source", type=Path, help="DICOM series folder, .nii/.nii.gz or .npy")
    preprocess.add_argument("--out", type=Path, help="write the model input [1, D, H, W] as .npy")
    preprocess.set_defaults(handler=run_preprocess)


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
