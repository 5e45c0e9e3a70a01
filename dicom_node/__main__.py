"""``python -m dicom_node``: the node's subcommands (serve, studies, deliveries) without the other packages."""

import argparse
import logging
import sys

from dicom_node.cli import register

if __name__ == "__main__":  # a spawned receiving process imports this module again (node.receive_processes)
    parser = argparse.ArgumentParser(prog="python -m dicom_node")
    register(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(arguments.handler(arguments))
