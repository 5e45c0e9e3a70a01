"""``python -m trainer``: the trainer's subcommands (train, evaluate, data, export, bundle ...) without the node's.

``torchrun --nproc-per-node 8 -m trainer train ...`` runs distributed training through it.
"""

import argparse
import logging
import sys

from model_export.cli import register as register_bundle_commands
from trainer.cli import register

parser = argparse.ArgumentParser(prog="python -m trainer")
subparsers = parser.add_subparsers(dest="command", required=True)
register(subparsers, register_bundle_commands(subparsers))
arguments = parser.parse_args()
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
sys.exit(arguments.handler(arguments))
