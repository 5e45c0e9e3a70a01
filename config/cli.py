"""The ``medfinder`` command: one entry point whose subcommands live in their own packages.

Each package contributes a ``register(subparsers)`` function; heavy imports (torch, pynetdicom...)
happen inside the command handlers so that ``medfinder --help`` and torch-free installs stay fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from config.loader import ConfigError, load_settings
from config.settings import Settings

REGISTRARS = ("trainer.cli", "model_export.cli", "dicom_node.cli")


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
    from config.loader import deep_merge

    overrides: dict[str, Any] = {}
    for item in args.overrides:
        overrides = deep_merge(overrides, item)
    return load_settings(args.config, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfinder", description="MedFinder Node: similar-case search for CT")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in REGISTRARS:
        module = __import__(module_name, fromlist=["register"])
        module.register(subparsers)
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


if __name__ == "__main__":
    raise SystemExit(main())
