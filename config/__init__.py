"""Configuration: the settings schema and its layered, validated loader."""

from config.loader import ConfigError, load_settings
from config.settings import Secret, Settings

__all__ = ["ConfigError", "Secret", "Settings", "load_settings"]
