"""Build :class:`~config.settings.Settings` from defaults, a YAML file and the environment.

Precedence (last wins): code defaults < YAML file < ``MEDFINDER__SECTION__FIELD`` variables
< explicit overrides passed by a command line. Values from the environment are parsed as YAML
scalars, so ``MEDFINDER__TRAIN__EPOCHS=3`` is an int and ``...AMP=false`` a bool.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.settings import Settings

ENV_PREFIX = "MEDFINDER__"
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message lists every offending field."""


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Nested overrides from ``MEDFINDER__A__B=value`` variables (names are case-insensitive)."""
    environ = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX):].split("__") if part]
        if not keys:
            continue
        node = overrides
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None
    return overrides


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A YAML path, or the bare name of a preset in ``config/presets`` (``tiny``, ``paper``...)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESETS_DIR / f"{path.name}.yaml" if path.suffix == "" else PRESETS_DIR / path.name
    if preset.exists():
        return preset
    available = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (presets: {available})")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for anything else."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per offending field, named by its dotted path."""
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {location}: {error['msg']}")
    return "\n".join(lines)


def load_settings(
    config: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the YAML file (a path or preset name), then the environment, then ``overrides``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if config is not None:
        path = resolve_config_path(config)
        data = read_yaml(path)
        source = str(path)
    data = deep_merge(data, environment_overrides(environ))
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def dump_settings(settings: Settings) -> dict[str, Any]:
    """A JSON/YAML-ready dict (paths as strings), stored in checkpoints and bundles."""
    return settings.model_dump(mode="json")
