"""``python -m model_export``: the bundle-contract subcommands (``preprocess``) without torch."""

import argparse
import sys

from model_export.cli import register

parser = argparse.ArgumentParser(prog="python -m model_export")
register(parser.add_subparsers(dest="command", required=True))
arguments = parser.parse_args()
sys.exit(arguments.handler(arguments))
