"""The job's configuration: one typed schema (schema.py) and its sources (load.py): flags > a
YAML --config file > FTT_* environment variables > defaults."""

from .schema import *  # noqa: F403
from .schema import BUILTIN_TASK, BUILTIN_TASK_FIELDS, _coerce, _read_yaml  # noqa: F401
