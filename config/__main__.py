"""``python -m config``: print the effective settings (defaults < YAML < environment) as YAML."""

import argparse
import sys

import yaml

from config.arguments import add_config_arguments, settings_from_args
from config.loader import ConfigError, dump_settings

parser = argparse.ArgumentParser(prog="python -m config", description=__doc__)
add_config_arguments(parser)
arguments = parser.parse_args()
try:
    print(yaml.safe_dump(dump_settings(settings_from_args(arguments)), sort_keys=False))
except ConfigError as exc:
    print(exc, file=sys.stderr)
    raise SystemExit(2) from None
