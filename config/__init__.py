"""One typed configuration for MedFinder Node: defaults in code, YAML file, environment variables, ``--set``.

``settings`` (the pydantic model), ``loader`` (YAML + environment), ``arguments`` (``--config``/``--set`` for
every subcommand), ``presets/``. The bottom layer: imports nothing of ours.
"""

from config.loader import ConfigError, dump_settings, load_settings, resolve_config_path
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "dump_settings", "load_settings", "resolve_config_path"]
