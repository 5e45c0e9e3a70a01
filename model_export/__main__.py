"""``python -m model_export``: the bundle-contract subcommands (preprocess, bundle list/verify/activate/install).

All torch-free; ``export`` and ``bundle reference`` are the trainer's (``python -m trainer``).
"""

import argparse
import logging
import sys

from model_export.cli import register

parser = argparse.ArgumentParser(prog="python -m model_export")
parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
register(parser.add_subparsers(dest="command", required=True))
arguments = parser.parse_args()
logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
sys.exit(arguments.handler(arguments))
