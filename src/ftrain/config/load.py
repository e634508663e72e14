"""Where a Config's values come from: command-line flags > a YAML ``--config`` file > FTT_*
environment variables (``FTT_<OPTION>``, e.g. ``FTT_EPOCHS=5``) > defaults; or a mapping from
Python (``ftrain.fit(task, {...})``). Every problem is collected and reported at once, before
any process group starts; the caller exits with code 2.

The task's own options (``Task.options``: the built-in task's --dataset, --model, ...) are flat
options like the others, in every source; the task named by --task (or the file, or the
environment) decides which exist, so it is imported first.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import MISSING, Field, fields
from typing import Any

from .schema import ENV_PREFIX, EXAMPLES, SECTIONS, Config, ConfigError, flag, json_object

# The options that hold a mapping: JSON text on the command line and in the environment.
MAPPINGS = ("task_args", "storage_options")


def _default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


def _coerce(f: Field, value: Any, source: str, problems: list[str]) -> Any:
    """``value`` (text from the command line or the environment, or a YAML/Python value) as
    the field's type; None (and a problem naming the flag and the source) when it is not."""
    kind = type(_default(f))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                return int(value)
            except (TypeError, ValueError):
                raise ValueError("expected an integer") from None
        if kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError("expected a number") from None
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if kind is dict:
            if isinstance(value, dict):
                return dict(value)
            return json_object(str(value), EXAMPLES.get(f.name, "{}"))
        if isinstance(value, (dict, list)):
            raise ValueError("expected a single value")
        return str(value)
    except (TypeError, ValueError) as e:
        where = "" if source == flag(f.name) else f" (from {source})"
        if kind is dict:  # the text is not shown: storage options may hold credentials
            problems.append(f"{flag(f.name)}{where}: {e}")
        else:
            problems.append(f"{flag(f.name)}{where}: {value!r} is invalid: {e}")
        return None


def options_of(task: str) -> tuple[type | None, str | None]:
    """The options class of the task ``task`` names (None: it has none), and the problem
    when it cannot be imported."""
    from ..tasks import TaskError, options_class

    try:
        return options_class(task), None
    except TaskError as e:
        return None, str(e)


def _visible(cls: type) -> list[Field]:
    return [f for f in fields(cls) if not f.metadata.get("hidden")]


def build_parser(options: type | None = None, task: str = "") -> argparse.ArgumentParser:
    """The command line's parser: every Config option by section, then ``options`` (the task's
    own, when it has them). Without arguments: those of the default task."""
    if options is None and not task:
        options, _problem = options_of(Config().task)
        task = Config().task
    parser = argparse.ArgumentParser(
        prog="python -m ftrain.train",
        description="Fault-tolerant DDP training with automatic resume. Also run by torchrun: "
        "torchrun --nproc_per_node=4 -m ftrain.train [options] (from a checkout also -m "
        "src.train; installed also ftrain-train). Every option can also be set in a "
        f"YAML --config file or as an environment variable {ENV_PREFIX}<OPTION> (e.g. "
        f"{ENV_PREFIX}EPOCHS=5); flags win over the file, the file over the environment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
        # No prefixes: "--epoch 3" would silently mean --epochs, and a prefix that a new
        # option makes ambiguous would break a user's script.
        allow_abbrev=False,
    )
    groups = {name: parser.add_argument_group(f"{name} options", text)
              for name, text in SECTIONS.items()}
    for f in _visible(Config):
        _add(groups[f.metadata["section"]], f)
    if options is not None:
        group = parser.add_argument_group(
            f"the task's own options ({task})",
            "passed to the task as arguments; --task-args wins over them")
        for f in _visible(options):
            _add(group, f)
    return parser


def _add(group: Any, f: Field) -> None:
    default = _default(f)
    kw: dict[str, Any] = {"help": f.metadata["help"] + f" (default: {default!r})"}
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    if isinstance(default, bool):
        group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
    else:
        group.add_argument(flag(f.name), metavar=f.name.upper(), type=str, **kw)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the Config from defaults, environment, YAML file and flags.

    Raises ConfigError (every problem at once) and SystemExit(2) for unknown flags.
    """
    environ = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    # Which task, and from which file, before the real parse: the task decides which options
    # exist. (A value refused here is refused again, with its source, below.)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--task")
    pre.add_argument("--config")
    known, _rest = pre.parse_known_args(argv)
    config_path = known.config or environ.get(ENV_PREFIX + "CONFIG", "")
    data = _read_yaml(config_path, problems) if config_path else {}
    task = known.task or _yaml_task(data) or environ.get(ENV_PREFIX + "TASK") or Config().task
    options, problem = options_of(task)
    module, _, attr = task.partition(":")
    if problem and module.strip() and attr.strip():  # a malformed string: the schema says so
        problems.append(problem)
    args = vars(build_parser(options, task).parse_args(argv))

    layers = Layers(options, problems)
    for f in layers.all:  # the environment
        key = ENV_PREFIX + f.name.upper()
        if key in environ:
            layers.set(f, environ[key], f"${key}")
    if config_path:
        layers.set(layers.config_fields["config"], config_path, "--config")
        layers.mapping(data, config_path)
    for name, raw in args.items():  # the command line
        layers.set(layers.by_name[name], raw, flag(name))
    return layers.config(problems)


def config_from(values: dict[str, Any], options: type | None, source: str = "fit()") -> Config:
    """A Config from a Python mapping of flat option names over the defaults
    (``{"epochs": 3, "model": "mlp"}``; a section's mapping, ``{"optimization": {"lr": 0.1}}``,
    works too). ``options``: the task's own options class (None: it has none)."""
    problems: list[str] = []
    layers = Layers(options, problems)
    layers.mapping(dict(values), source, python=True)
    return layers.config(problems)


class Layers:
    """Values from one source after another, each overriding the ones before it; the task's
    own options collected apart (Config.task_options)."""

    def __init__(self, options: type | None, problems: list[str]) -> None:
        self.options = options
        self.problems = problems
        self.config_fields = {f.name: f for f in fields(Config)}
        self.option_fields = {f.name: f for f in _visible(options)} if options else {}
        self.by_name = {**self.config_fields, **self.option_fields}
        self.all = [f for f in self.by_name.values() if not f.metadata.get("hidden")]
        self.values: dict[str, Any] = {}
        self.task_options: dict[str, Any] = {}
        # Where each value not given as a flag came from, so that a problem names the file or
        # the variable to fix: "$FTT_EPOCHS", "job.yaml:batch_size".
        self.sources: dict[str, str] = {}

    def set(self, f: Field, raw: Any, source: str) -> None:
        value = _coerce(f, raw, source, self.problems)
        if value is None:
            return
        into = self.task_options if f.name in self.option_fields and \
            f.name not in self.config_fields else self.values
        into[f.name] = value
        if source.startswith("--") and source == flag(f.name):
            self.sources.pop(f.name, None)
        else:
            self.sources[f.name] = source

    def mapping(self, data: dict[str, Any], where: str, python: bool = False) -> None:
        """A YAML file's or a Python mapping's options: flat names (dashes allowed), a
        section's mapping of them, and the task: section (``import`` and its arguments)."""
        task = data.pop("task", None)
        if isinstance(task, dict):
            task = dict(task)
            if "import" in task:
                self.set(self.config_fields["task"], task.pop("import"), f"{where}:task.import")
            self.set(self.config_fields["task_args"], task, f"{where}:task")
        elif task is not None:
            self.set(self.config_fields["task"], task, f"{where}:task")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name in SECTIONS and isinstance(value, dict) and name not in self.by_name:
                self.mapping(dict(value), f"{where}:{key}", python)
                continue
            f = self.by_name.get(name)
            if f is None or name == "config" or f.metadata.get("hidden") and not python:
                choices = sorted(set(self.by_name) - {"config", "task_options"})
                close = difflib.get_close_matches(name, choices, n=1)
                hint = (f" (did you mean {close[0]!r}?)" if close else
                        "; `python -m ftrain.train --help` lists the options")
                self.problems.append(f"{where} has unknown option {key!r}{hint}"
                                     if python else
                                     f"--config: {where!r} has unknown option {key!r}{hint}")
                continue
            if f.name == "task_options":  # Config(**cfg.to_dict()) round trips
                for k, v in dict(value).items():
                    if k in self.option_fields:
                        self.set(self.option_fields[k], v, f"{where}:{key}")
                continue
            self.set(f, value, f"{where}:{key}")

    def config(self, problems: list[str]) -> Config:
        try:
            cfg = Config(**self.values, task_options=self.task_options)
        except ConfigError as e:
            problems.extend(_with_source(p, self.sources) for p in e.problems)
            raise ConfigError(problems) from None
        if self.options is not None:
            problems.extend(_with_source(p, self.sources)
                            for p in option_problems(self.options, self.task_options))
        if problems:
            raise ConfigError(problems)
        return cfg


def option_problems(options: type, values: dict[str, Any]) -> list[str]:
    """The task's own options checked: choices, then the options class's ``problems()``."""
    out = []
    for f in _visible(options):
        choices = f.metadata.get("choices")
        if f.name in values and choices and values[f.name] not in choices:
            out.append(f"{flag(f.name)}: {values[f.name]!r} is not one of {', '.join(choices)}")
    if out:
        return out
    return list(options(**values).problems())


def _with_source(problem: str, sources: dict[str, str]) -> str:
    """``--flag: ...`` -> ``--flag (from SOURCE): ...`` for a value that was not a flag."""
    head, sep, rest = problem.partition(": ")
    name = head[2:].replace("-", "_")
    if not sep or not head.startswith("--") or name not in sources:
        return problem
    return f"{head} (from {sources[name]}): {rest}"


def _yaml_task(data: dict[str, Any]) -> str | None:
    task = data.get("task")
    if isinstance(task, dict):
        task = task.get("import")
    return str(task) if isinstance(task, str) and task else None


def _read_yaml(path: str, problems: list[str]) -> dict[str, Any]:
    """The mapping in a YAML --config file ({} and a problem when it has none)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        problems.append(f"--config: cannot read {path!r}: {e.strerror or e}")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"--config: {path!r} is not valid YAML: {e}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config: {path!r} must hold a mapping of option: value")
        return {}
    return data
