"""One typed configuration for MedFinder Node: defaults in code, YAML file, environment variables."""

from config.loader import ConfigError, dump_settings, load_settings, resolve_config_path
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "dump_settings", "load_settings", "resolve_config_path"]
