"""Typed config: the schema (``schema.py``), YAML loading (``loader.py``) and validation
(``validate.py``). ``load_config`` is the one entry point for files (``load_config_text`` for
the same YAML as text) and ``load_section`` for one section handed to the Python API; all raise
``ConfigError`` (one line, ``errors.py``)."""

from trinity.config.errors import ConfigError
from trinity.config.loader import (
    build_config,
    load_config,
    load_config_text,
    load_section,
    read_yaml,
)
from trinity.config.schema import Config
from trinity.config.serialize import to_yaml

__all__ = [
    "Config",
    "ConfigError",
    "build_config",
    "load_config",
    "load_config_text",
    "load_section",
    "read_yaml",
    "to_yaml",
]
