"""One typed configuration schema for the training service.

Precedence, highest first: command-line flags > YAML ``--config`` file > environment variables
(``FTT_<FIELD>``, e.g. ``FTT_EPOCHS=5``) > defaults. Every problem is collected and reported at
once, before any process group starts; the caller exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "FTT_"
EXIT_INVALID = 2

DATASETS = ("synthetic", "fashion-mnist", "mnist", "cifar10")
MODELS = ("cnn", "mlp", "resnet18")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")

BUILTIN_TASK = "ftrain.tasks:ImageClassification"
# Flags that configure the built-in task only (ftrain.tasks.ImageClassification's arguments).
BUILTIN_TASK_FIELDS = ("dataset", "model", "width", "depth", "synthetic_train_size",
                       "synthetic_test_size")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class Config:
    """The whole job's configuration. Each field is also a ``--flag`` (underscores -> dashes)."""

    # --- task ---
    task: str = _opt(BUILTIN_TASK, "Task to train, as an import string 'package.module:attr' (a "
                     "Task, a Task class or a factory). The default is the built-in image "
                     "classification task, configured by --dataset, --model and their flags.")
    task_args: str = _opt("", "The task's arguments as a JSON object (YAML: the task: section).")
    # --- the built-in task's arguments (ignored by other tasks) ---
    dataset: str = _opt("synthetic", "Dataset to train on; 'synthetic' needs no download.", DATASETS)
    data_dir: str = _opt("./data", "Folder (or s3:// URL) holding the torchvision datasets.")
    download: bool = _opt(False, "Download the torchvision dataset into --data-dir if missing.")
    synthetic_train_size: int = _opt(12288, "Training samples of the synthetic dataset.")
    synthetic_test_size: int = _opt(2048, "Test samples of the synthetic dataset.")
    num_workers: int = _opt(0, "DataLoader worker processes per rank, for training and for "
                            "evaluation each; started once as training starts, kept for the run.")
    data_on_device: str = _opt("auto", "'auto': an in-memory tensor training set without "
                               "per-item transforms (synthetic, MNIST-like) is put on the device "
                               "once and batches are gathered there from the sampler's indices "
                               "(same samples, same order); 'off': always a DataLoader.",
                               ("auto", "off"))
    # --- model ---
    model: str = _opt("cnn", "Model: small BatchNorm CNN, MLP (--width/--depth) or resnet18.", MODELS)
    width: int = _opt(256, "Hidden width of the MLP model.")
    depth: int = _opt(2, "Number of hidden layers of the MLP model.")
    # --- optimisation ---
    epochs: int = _opt(4, "Number of epochs to train in total (raise it to continue a run).")
    batch_size: int = _opt(256, "Global batch size, across all workers (per rank = global / world).")
    lr: float = _opt(0.05, "Peak learning rate.")
    optimizer: str = _opt("sgd", "Optimizer.", OPTIMIZERS)
    momentum: float = _opt(0.9, "SGD momentum (AdamW: beta1).")
    weight_decay: float = _opt(1e-4, "Weight decay.")
    scheduler: str = _opt("cosine", "LR schedule, stepped once per optimizer step.", SCHEDULERS)
    lr_step_epochs: int = _opt(1, "'step' scheduler: decay the LR every this many epochs.")
    lr_gamma: float = _opt(0.5, "'step' scheduler: decay factor.")
    grad_accum: int = _opt(1, "Split each rank's share of the global batch into N micro-batches "
                           "(gradient accumulation); the global batch stays the unit of work.")
    clip_grad_norm: float = _opt(0.0, "Clip the gradients' global norm to this value (0: off).")
    precision: str = _opt("fp32", "Autocast precision of forward and loss: fp32 (off), bf16, or "
                          "fp16 (with a gradient scaler, checkpointed).", ("fp32", "bf16", "fp16"))
    seed: int = _opt(0, "Seed of all randomness (data, init, order, augmentation).")
    deterministic: bool = _opt(False, "Use deterministic algorithms (exact GPU resume; slower).")
    # --- system ---
    device: str = _opt("auto", "Device: cuda when available (auto), else cpu.", DEVICES)
    dist_timeout: float = _opt(300.0, "Seconds a collective may wait for a peer before failing.")
    parallel: str = _opt("ddp", "How the workers share the model: 'ddp' (every rank holds the "
                         "whole model; rank 0 writes each checkpoint) or 'fsdp' (FSDP2: each "
                         "rank holds a shard of the parameters, gradients and optimizer state, "
                         "and writes its own shard of every checkpoint).", PARALLEL)
    # --- checkpoints ---
    checkpoint_dir: str = _opt("./checkpoints", "Folder or s3:// URL for checkpoints.")
    resume: str = _opt("auto", "'auto' (newest valid checkpoint, if any), 'never', or a URI.")
    save_every_steps: int = _opt(0, "Also checkpoint every N global steps (0: off).")
    save_every_seconds: float = _opt(600.0, "Also checkpoint every S seconds (0: off).")
    keep_last: int = _opt(3, "Keep the newest K committed checkpoints (at least 2).")
    max_steps: int = _opt(0, "Stop after N global steps, checkpointing first (0: no limit).")
    storage_options: str = _opt("", "Extra fsspec options as JSON, e.g. '{\"anon\": false}'.")
    max_failed_saves: int = _opt(3, "Exit with the retryable code 140 after this many consecutive failed saves.")
    preemption_deadline: float = _opt(25.0, "Seconds allowed for the emergency checkpoint on SIGTERM.")
    orphan_grace_seconds: float = _opt(3600.0, "Delete leftovers of crashed writers older than this.")
    # --- reporting ---
    log_every_steps: int = _opt(20, "Print progress on rank 0 every N steps (0: off).")
    log_format: str = _opt("text", "'text': readable lines on stderr, with a progress bar on rank 0 "
                           "when stderr is a terminal; 'json': one JSON object per line, the "
                           "rank in each, for log collectors.", ("text", "json"))
    heartbeat_file: str = _opt("", "File created at start-up and touched every training step "
                               "(by each node's local rank 0), for a liveness probe that checks "
                               "its age (empty: off).")
    metrics_port: int = _opt(0, "Serve Prometheus metrics from rank 0 on this port at /metrics "
                             "(0: off).")
    tensorboard: str = _opt("", "Local folder for TensorBoard event files from rank 0: scalars per "
                            "logged step and per epoch; a resumed run continues the same curves "
                            "(empty: off).")
    trace_samples: str = _opt("", "Debug: folder to write the sample indices each rank trains on.")
    config: str = _opt("", "YAML file with any of these options (flags override it).")

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every invalid value, each naming its flag and what to do."""
        p: list[str] = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                p.append(f"{flag(f.name)}: {value!r} is not one of {', '.join(choices)}")

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                need = ">= 0" if allow_zero else "> 0"
                p.append(f"{flag(name)}: must be {need}, got {v}")

        for name in ("epochs", "batch_size", "synthetic_train_size", "synthetic_test_size",
                     "width", "depth", "lr_step_epochs", "max_failed_saves", "dist_timeout",
                     "preemption_deadline", "grad_accum"):
            positive(name)
        for name in ("lr", "num_workers", "save_every_steps", "save_every_seconds", "max_steps",
                     "weight_decay", "momentum", "log_every_steps", "orphan_grace_seconds",
                     "clip_grad_norm"):
            positive(name, allow_zero=True)
        if not 0 <= self.metrics_port <= 65535:
            p.append(f"{flag('metrics_port')}: {self.metrics_port} is not a TCP port; use 1-65535, "
                     "or 0 for off")
        if "://" in self.tensorboard and not self.tensorboard.startswith("file://"):
            p.append(f"{flag('tensorboard')}: {self.tensorboard!r} is not a local folder; event "
                     "files are written locally (sync the folder to remote storage yourself)")
        if self.lr == 0:
            p.append(f"{flag('lr')}: must be > 0")
        if self.lr_gamma <= 0 or self.lr_gamma > 1:
            p.append(f"{flag('lr_gamma')}: must be in (0, 1], got {self.lr_gamma}")
        if self.keep_last < 2:
            p.append(f"{flag('keep_last')}: must be at least 2 (a fallback is always kept), "
                     f"got {self.keep_last}")
        if self.batch_size > 0 and self.grad_accum > 0 and self.batch_size % self.grad_accum:
            p.append(f"{flag('grad_accum')}: {self.grad_accum} does not divide --batch-size "
                     f"{self.batch_size}; pick a divisor of it")
        if self.parallel == "fsdp" and self.precision == "fp16":
            p.append(f"{flag('precision')}: fp16 is not supported with --parallel fsdp (its "
                     "gradient scaler would judge each rank's shard alone); use bf16 or fp32")
        module, _, attr = self.task.partition(":")
        if not module.strip() or not attr.strip() or ":" in attr:
            p.append(f"{flag('task')}: {self.task!r} is not an import string "
                     "'package.module:attr'")
        try:
            self.task_args_dict()
        except ValueError as e:
            p.append(f"{flag('task_args')}: {e}")
        builtin = self.task == BUILTIN_TASK
        if builtin and self.dataset == "synthetic" and self.batch_size > self.synthetic_train_size:
            p.append(f"{flag('batch_size')}: {self.batch_size} is larger than the training set "
                     f"({flag('synthetic_train_size')} {self.synthetic_train_size})")
        if builtin and self.model == "resnet18" and self.dataset != "cifar10":
            p.append(f"{flag('model')}: resnet18 expects 32x32 colour input; use --dataset cifar10")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            p.append(f"{flag('resume')}: give 'auto', 'never' or a checkpoint URI")
        if not self.checkpoint_dir.strip():
            p.append(f"{flag('checkpoint_dir')}: must not be empty")
        for name in ("checkpoint_dir", "data_dir") + (("resume",) if self.resume not in
                                                      ("auto", "never") else ()):
            problem = _protocol_problem(getattr(self, name))
            if problem:
                p.append(f"{flag(name)}: {problem}")
        try:
            self.storage_options_dict()
        except ValueError as e:
            p.append(f"{flag('storage_options')}: {e}")
        return p

    def storage_options_dict(self) -> dict[str, Any]:
        """``--storage-options`` parsed; raises ValueError with the reason."""
        return json_object(self.storage_options, '{"anon": false}')

    def task_args_dict(self) -> dict[str, Any]:
        """``--task-args`` parsed; raises ValueError with the reason."""
        return json_object(self.task_args, '{"layers": 4}')

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Storage options may hold credentials: never written into checkpoints or logs.
        d["storage_options"] = "<redacted>" if self.storage_options.strip() else ""
        return d

    def digest(self) -> str:
        """SHA-256 of the whole configuration (storage options redacted), for the manifest."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def json_object(text: str, example: str) -> dict[str, Any]:
    """A JSON object given as text ('' is {}); raises ValueError with the reason."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a JSON object, e.g. '{example}'")
    return value


def _protocol_problem(uri: str) -> str | None:
    """Why fsspec cannot open ``uri`` (unknown protocol, its package missing), else None."""
    if "://" not in uri:
        return None
    import fsspec

    protocol = uri.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return f"unknown storage protocol {protocol!r} in {uri!r}; use a local path or s3://"
    except ImportError as e:
        return f"{protocol}:// needs a package that is not installed ({e})"
    return None


class ConfigError(Exception):
    """Invalid configuration; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(Config)}


def _coerce(name: str, value: Any, source: str, problems: list[str]) -> Any:
    """Convert ``value`` (string from env/CLI, or YAML scalar) to the field's type."""
    kind = _field_types()[name]
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
        if kind is str and name in ("storage_options", "task_args") and isinstance(value, dict):
            return json.dumps(value)
        return str(value)
    except (TypeError, ValueError) as e:
        where = "" if source == flag(name) else f" (from {source})"
        problems.append(f"{flag(name)}{where}: {value!r} is invalid: {e}")
        return None


def build_parser() -> argparse.ArgumentParser:
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
    defaults = Config.__dataclass_fields__
    for f in fields(Config):
        kw: dict[str, Any] = {"help": f.metadata["help"] + f" (default: {defaults[f.name].default!r})"}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if isinstance(f.default, bool):
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            kw["metavar"] = f.name.upper()
            kw["type"] = str
            parser.add_argument(flag(f.name), **kw)
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the Config from defaults, environment, YAML file and flags.

    Raises ConfigError (every problem at once) and SystemExit(2) for unknown flags.
    """
    environ = dict(os.environ if environ is None else environ)
    args = vars(build_parser().parse_args(argv))
    problems: list[str] = []
    values: dict[str, Any] = {}
    # Where each value not given as a flag came from, so that a problem names the file or the
    # variable to fix: "$FTT_EPOCHS", "job.yaml:batch_size".
    sources: dict[str, str] = {}
    names = {f.name for f in fields(Config)}

    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key], f"${key}", problems)
            sources[name] = f"${key}"

    config_path = args.get("config", values.get("config") or "")
    if config_path:
        values["config"] = config_path
        values.update(_read_yaml(config_path, names, problems, sources))

    for name, raw in args.items():
        values[name] = _coerce(name, raw, flag(name), problems)
        sources.pop(name, None)

    values = {k: v for k, v in values.items() if v is not None}
    try:
        cfg = Config(**values)
    except ConfigError as e:
        problems.extend(_with_source(p, sources) for p in e.problems)
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def _with_source(problem: str, sources: dict[str, str]) -> str:
    """``--flag: ...`` -> ``--flag (from SOURCE): ...`` for a value that was not a flag."""
    head, sep, rest = problem.partition(": ")
    name = head[2:].replace("-", "_")
    if not sep or not head.startswith("--") or name not in sources:
        return problem
    return f"{head} (from {sources[name]}): {rest}"


def _read_yaml(path: str, names: set[str], problems: list[str],
               sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The options in a YAML --config file; ``sources`` learns "path:key" of each."""
    import difflib

    import yaml

    sources = {} if sources is None else sources

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
    out: dict[str, Any] = {}
    task = data.pop("task", None)
    if isinstance(task, dict):
        # The task: section: 'import' names the task, every other key is one of its arguments.
        task = dict(task)
        if "import" in task:
            out["task"] = _coerce("task", task.pop("import"), f"{path}:task.import", problems)
            sources["task"] = f"{path}:task.import"
        out["task_args"] = json.dumps(task)
        sources["task_args"] = f"{path}:task"
    elif task is not None:
        out["task"] = _coerce("task", task, f"{path}:task", problems)
        sources["task"] = f"{path}:task"
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names or name == "config":
            close = difflib.get_close_matches(name, sorted(names - {"config"}), n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    "; `python -m ftrain.train --help` lists the options")
            problems.append(f"--config: {path!r} has unknown option {key!r}{hint}")
            continue
        out[name] = _coerce(name, value, f"{path}:{key}", problems)
        sources[name] = f"{path}:{key}"
    return out
