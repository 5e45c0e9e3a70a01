"""``python -m trainer``: the trainer's subcommands (train, evaluate, data) without the other packages."""

import argparse
import logging
import sys

from trainer.cli import register

parser = argparse.ArgumentParser(prog="python -m trainer")
register(parser.add_subparsers(dest="command", required=True))
arguments = parser.parse_args()
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
sys.exit(arguments.handler(arguments))
