"""Typed configuration: the schema (`configs.schema`), the loader, and the YAML presets beside them."""

from configs.errors import ConfigError
from configs.loader import PRESET_DIR, load_config, resolve_config_path, to_yaml
from configs.schema import Config

__all__ = ["Config", "ConfigError", "PRESET_DIR", "load_config", "resolve_config_path", "to_yaml"]
