"""Settings from the command line: ``--config FILE`` and ``--set key=value`` for every subcommand that needs them.

The loader's command-line face (defaults < YAML < environment < ``--set``); the ``medfinder`` command itself is
assembled in the top-level ``medfinder`` module.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from config.loader import deep_merge, load_settings
from config.settings import Settings


def parse_assignment(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    node: dict[str, Any] = {}
    root = node
    parts = [p for p in key.strip().split(".") if p]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(raw)
    return root


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value`` overrides, for every command that needs settings."""
    parser.add_argument("--config", help="YAML file or preset name (config/presets: tiny, synthetic-cpu, paper)")
    parser.add_argument("--set", dest="overrides", action="append", type=parse_assignment, default=[],
                        metavar="KEY=VALUE", help="override one setting, e.g. train.epochs=3 (repeatable)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults < YAML < environment < ``--set`` overrides."""
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        overrides = deep_merge(overrides, item)
    return load_settings(args.config, overrides=overrides)
