"""The job's configuration: one typed schema in sections (schema.py) and where its values
come from (load.py): flags > a YAML --config file > FTT_* environment variables > defaults, or
a mapping from Python."""

from .load import build_parser, config_from, load_config, option_problems, options_of
from .schema import (
    DEFAULT_TASK,
    ENV_PREFIX,
    SECTIONS,
    Config,
    ConfigError,
    flag,
    json_object,
    option,
)

__all__ = ["DEFAULT_TASK", "ENV_PREFIX", "SECTIONS", "Config", "ConfigError", "build_parser",
           "config_from", "flag", "json_object", "load_config", "option", "option_problems",
           "options_of"]
