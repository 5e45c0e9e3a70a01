"""The ``medfinder`` command, assembled from each package's subcommands (also ``python -m medfinder``).

It sits above every package and is imported by none: ``model_export`` adds ``preprocess`` and
``bundle``, ``trainer`` adds training, evaluation and the bundle-making commands (``export``, ``bundle
reference``), ``dicom_node`` adds the node's. Heavy imports (torch, pynetdicom, onnxruntime) happen inside the
command handlers, so ``medfinder --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from config.loader import ConfigError
from dicom_node import cli as node_cli
from dicom_node.backfill import cli as backfill_cli
from dicom_node.orthanc import cli as orthanc_cli
from model_export import cli as bundle_cli
from trainer import cli as trainer_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfinder", description="MedFinder Node: similar-case search for CT")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bundle_actions = bundle_cli.register(subparsers)
    trainer_cli.register(subparsers, bundle_actions)
    node_cli.register(subparsers)
    orthanc_cli.register(subparsers)
    backfill_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"medfinder: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medfinder: interrupted", file=sys.stderr)
        return 130
