"""Typed config: the schema (``schema.py``), YAML loading (``loader.py``) and validation
(``validate.py``). ``load_config`` is the one entry point; it raises ``ConfigError`` (one line)."""

from trinity.config.loader import ConfigError, build_config, load_config, read_yaml
from trinity.config.schema import Config
from trinity.config.serialize import to_yaml

__all__ = ["Config", "ConfigError", "build_config", "load_config", "read_yaml", "to_yaml"]
