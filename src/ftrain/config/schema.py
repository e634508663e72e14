"""One typed configuration schema for the training service, in sections (task, data,
optimization, run, parallel, checkpoint, monitor); each field is also a flat option. Where the
values come from is load.py's business."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import InputError

ENV_PREFIX = "FTT_"
EXIT_INVALID = 2

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")

# The built-in image classification task (tasks/builtin/), under the import string every
# checkpoint it wrote records.
DEFAULT_TASK = "ftrain.tasks:ImageClassification"


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           section: str = "task") -> Any:
    """A dataclass field that is also a flat option: ``--name`` on the command line, ``name:``
    in a YAML --config file, ``FTT_NAME`` in the environment. A task's own options
    (``Task.options``) are made with it too."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, "choices": choices,
                                                     "section": section})
    return field(default=default, metadata={"help": help, "choices": choices, "section": section})


# The order of --help's groups (and of docs/reference/options.md).
SECTIONS = {
    "task": "what to train",
    "data": "how the task's data is read",
    "optimization": "the arithmetic of training (docs/design/resume-rules.md says which may change on resume)",
    "run": "devices and the process group",
    "parallel": "how the workers share the model",
    "checkpoint": "where and when checkpoints are written, and how many are kept",
    "storage": "how storage calls are retried and S3 transfers cut (checkpoints and data)",
    "monitor": "what a running job shows: logs, heartbeat, metrics, TensorBoard",
    "config": "the configuration file",
}


def _in(section: str):
    def make(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
        return option(default, help, choices, section)
    return make


_task, _data, _optim, _run = _in("task"), _in("data"), _in("optimization"), _in("run")
_parallel, _ckpt, _monitor = _in("parallel"), _in("checkpoint"), _in("monitor")
_storage = _in("storage")


@dataclass
class Config:
    """The whole job's configuration. Each field is also a ``--flag`` (underscores -> dashes);
    ``section`` in its metadata groups it (``--help``, docs/reference/options.md)."""

    # --- task ---
    task: str = _task(DEFAULT_TASK, "Task to train, as an import string 'package.module:attr' "
                      "(a Task, a Task class or a factory). The default is the built-in image "
                      "classification task; its own options (--dataset, --model, ...) are listed "
                      "below.")
    task_args: dict = _task({}, "The task's arguments: a JSON object on the command line and in "
                            "FTT_TASK_ARGS, a mapping in Python and in YAML (the task: "
                            "section). They win over the task's own options.")
    # The values of the task's own options (Task.options) given by a flag, the YAML file or
    # the environment: {"model": "mlp"}. Not a flag itself: each option is.
    task_options: dict = field(default_factory=dict, metadata={
        "help": "", "choices": None, "section": "task", "hidden": True})
    # --- data ---
    data_dir: str = _data("./data", "Folder (or s3:// URL) the task reads its data from (the "
                          "built-in task: the torchvision datasets).")
    download: bool = _data(False, "Let the task download its data into --data-dir if missing.")
    num_workers: int = _data(0, "DataLoader worker processes per rank, for training and for "
                             "evaluation each; started once as training starts, kept for the "
                             "run.")
    eval_every_steps: int = _data(0, "Also evaluate every N global steps inside epochs (0: "
                                  "at each epoch's end only); recorded in the train state's "
                                  "evals.")
    eval_batch_size: int = _data(0, "Evaluation batch per rank (0: the per-rank training "
                                 "batch, at least 256). The metrics do not depend on it.")
    data_cache: str = _data(".data-cache", "Node-local folder a remote (s3://) --data-dir is "
                            "copied into, once per node.")
    data_on_device: str = _data("auto", "'auto': an in-memory tensor training set without "
                                "per-item transforms (synthetic, MNIST-like) is put on the "
                                "device once and batches are gathered there from the sampler's "
                                "indices (same samples, same order); 'off': always a "
                                "DataLoader.", ("auto", "off"))
    # --- optimization ---
    epochs: int = _optim(4, "Number of epochs to train in total (raise it to continue a run).")
    batch_size: int = _optim(256, "Global batch size, across all workers (per rank = global / "
                             "world).")
    lr: float = _optim(0.05, "Peak learning rate.")
    optimizer: str = _optim("sgd", "Optimizer.", OPTIMIZERS)
    momentum: float = _optim(0.9, "SGD momentum (AdamW: beta1).")
    weight_decay: float = _optim(1e-4, "Weight decay.")
    scheduler: str = _optim("cosine", "LR schedule, stepped once per optimizer step.", SCHEDULERS)
    lr_step_epochs: int = _optim(1, "'step' scheduler: decay the LR every this many epochs.")
    lr_gamma: float = _optim(0.5, "'step' scheduler: decay factor.")
    grad_accum: int = _optim(1, "Split each rank's share of the global batch into N "
                             "micro-batches (gradient accumulation); the global batch stays the "
                             "unit of work.")
    clip_grad_norm: float = _optim(0.0, "Clip the gradients' global norm to this value (0: off).")
    precision: str = _optim("fp32", "Autocast precision of forward and loss: fp32 (off), bf16, "
                            "or fp16 (with a gradient scaler, checkpointed).",
                            ("fp32", "bf16", "fp16"))
    seed: int = _optim(0, "Seed of all randomness (data, init, order, augmentation).")
    deterministic: bool = _optim(False, "Use deterministic algorithms (exact GPU resume; "
                                 "slower).")
    # --- run ---
    device: str = _run("auto", "Device: cuda when available (auto), else cpu.", DEVICES)
    dist_timeout: float = _run(300.0, "Seconds a collective may wait for a peer before failing.")
    max_steps: int = _run(0, "Stop after N global steps, checkpointing first (0: no limit).")
    compile: str = _run("off", "torch.compile the training step's model with this mode "
                        "('default', 'reduce-overhead', 'max-autotune'); checkpoints keep the "
                        "model's own keys. The first step's time, compilation included, is "
                        "logged apart.", ("off", "default", "reduce-overhead", "max-autotune",
                                          "max-autotune-no-cudagraphs"))
    # --- parallel ---
    parallel: str = _parallel("ddp", "How the workers share the model: 'ddp' (every rank holds "
                              "the whole model; rank 0 writes each checkpoint) or 'fsdp' "
                              "(FSDP2: each rank holds a shard of the parameters, gradients "
                              "and optimizer state, and writes its own shard of every "
                              "checkpoint).", PARALLEL)
    # --- checkpoint ---
    checkpoint_dir: str = _ckpt("./checkpoints", "Folder or s3:// URL for checkpoints.")
    resume: str = _ckpt("auto", "'auto' (newest valid checkpoint, if any), 'never', or a URI.")
    init_from: str = _ckpt("", "A plain PyTorch checkpoint (a path or URI) a fresh run starts "
                           "from: a state_dict (the model's initial weights), or a script's "
                           "dict with model_state_dict (and optimizer_state_dict, "
                           "scheduler_state_dict, epoch: training continues at the next "
                           "epoch). Loaded with weights_only=True; ignored once the run has "
                           "checkpoints of its own.")
    save_every_steps: int = _ckpt(0, "Also checkpoint every N global steps (0: off).")
    save_every_seconds: float = _ckpt(600.0, "Also checkpoint every S seconds (0: off).")
    keep_last: int = _ckpt(3, "Keep the newest K committed checkpoints (at least 2).")
    keep_best: int = _ckpt(0, "Also keep the K best committed checkpoints by --best-metric "
                           "(each evaluation is then followed by a checkpoint); 0: off.")
    best_metric: str = _ckpt("", "The evaluation metric that ranks checkpoints and drives "
                             "early stopping, as the history names it: eval_loss, "
                             "eval_<your metric>.")
    best_mode: str = _ckpt("auto", "Whether lower (min) or higher (max) --best-metric is "
                           "better; auto: min for a metric ending in 'loss', else say it.",
                           ("auto", "min", "max"))
    early_stop_patience: int = _ckpt(0, "Stop training (exit 0, after a final checkpoint) once "
                                     "this many evaluations in a row did not improve "
                                     "--best-metric; 0: off.")
    storage_options: dict = _ckpt({}, "Extra fsspec options: a JSON object on the command line "
                                  "and in FTT_STORAGE_OPTIONS (e.g. '{\"anon\": false}'), a "
                                  "mapping in Python and YAML. Never recorded or logged.")
    max_failed_saves: int = _ckpt(3, "Exit with the retryable code 140 after this many "
                                  "consecutive failed saves.")
    preemption_deadline: float = _ckpt(25.0, "Seconds allowed for the emergency checkpoint on "
                                       "SIGTERM.")
    orphan_grace_seconds: float = _ckpt(3600.0, "Delete leftovers of crashed writers older than "
                                        "this.")
    # --- storage ---
    storage_retry_attempts: int = _storage(6, "Attempts of a storage call that fails "
                                           "transiently (timeouts, resets, 5xx), with "
                                           "exponential backoff and jitter.")
    storage_retry_deadline: float = _storage(90.0, "Seconds a storage call may spend in "
                                             "retries before it fails.")
    storage_retry_base_delay: float = _storage(0.2, "Seconds before the first retry (doubled "
                                               "each time, up to 5 s).")
    s3_part_mb: float = _storage(64.0, "S3: objects of two parts or more are uploaded and "
                                 "read in parts of this many MiB.")
    s3_concurrency: int = _storage(8, "S3: parts moved at once.")
    # --- monitor ---
    log_level: str = _monitor("INFO", "Rank 0's log level; the other ranks log warnings and "
                              "errors, or everything at DEBUG (each rank's memory too).",
                              ("DEBUG", "INFO", "WARNING", "ERROR"))
    progress: str = _monitor("auto", "'auto': a progress bar on rank 0 when stderr is a "
                             "terminal (and --log-format text); 'off': log lines only.",
                             ("auto", "off"))
    log_every_steps: int = _monitor(20, "Print progress on rank 0 every N steps (0: off).")
    log_format: str = _monitor("text", "'text': readable lines on stderr, with a progress bar "
                               "on rank 0 when stderr is a terminal; 'json': one JSON object "
                               "per line, the rank in each, for log collectors.",
                               ("text", "json"))
    heartbeat_file: str = _monitor("", "File created at start-up and touched as training goes "
                                   "on, at most 5 times a second (by each node's local rank "
                                   "0), for a liveness probe that checks its age (empty: off).")
    metrics_port: int = _monitor(0, "Serve Prometheus metrics from rank 0 on this port at "
                                 "/metrics (0: off).")
    tensorboard: str = _monitor("", "Local folder for TensorBoard event files from rank 0: "
                                "scalars per logged step and per epoch; a resumed run continues "
                                "the same curves (empty: off).")
    tracker: str = _monitor("none", "Experiment tracker of rank 0: 'mlflow' or 'wandb' (pip "
                            "install 'ftrain[mlflow]' / 'ftrain[wandb]'). One run per job "
                            "across restarts; a point is published once a checkpoint covering "
                            "its step has committed, so each step's point is there exactly "
                            "once.", ("none", "mlflow", "wandb"))
    tracker_uri: str = _monitor("", "MLflow's tracking URI (default: $MLFLOW_TRACKING_URI, "
                                "else MLflow's own default); W&B takes its settings from its "
                                "WANDB_* variables.")
    tracker_project: str = _monitor("ftrain", "The MLflow experiment or W&B project of the "
                                    "run.")
    tracker_run_name: str = _monitor("", "The run's display name (empty: the tracker's "
                                     "choice).")
    trace_samples: str = _monitor("", "Debug: folder to write the sample indices each rank "
                                  "trains on.")
    config: str = option("", "YAML file with any of these options (flags override it).",
                         section="config")

    def __post_init__(self) -> None:
        problems: list[str] = []
        # From Python (fit(), Config(...)) these may come as JSON text, as on the command line.
        for name in ("task_args", "storage_options", "task_options"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json_object(value, EXAMPLES.get(name, "{}"))
                except ValueError as e:
                    problems.append(f"{flag(name)}: {e}")
                    value = {}
                setattr(self, name, value)
            elif not isinstance(value, dict):
                problems.append(f"{flag(name)}: must be a mapping (a JSON object), got "
                                f"{type(value).__name__}")
                setattr(self, name, {})
        if isinstance(self.log_level, str):
            self.log_level = self.log_level.upper()  # FTT_LOG_LEVEL=debug worked before
        problems += self.problems()
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

        for name in ("epochs", "batch_size", "lr_step_epochs", "max_failed_saves",
                     "dist_timeout", "preemption_deadline", "grad_accum",
                     "storage_retry_attempts", "storage_retry_deadline", "s3_part_mb",
                     "s3_concurrency"):
            positive(name)
        for name in ("lr", "num_workers", "save_every_steps", "save_every_seconds", "max_steps",
                     "weight_decay", "momentum", "log_every_steps", "orphan_grace_seconds",
                     "clip_grad_norm", "storage_retry_base_delay", "eval_batch_size",
                     "eval_every_steps", "keep_best", "early_stop_patience"):
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
        for name in ("keep_best", "early_stop_patience"):
            if getattr(self, name) and not self.best_metric:
                p.append(f"{flag(name)}: needs --best-metric (the metric that ranks "
                         "evaluations, e.g. eval_loss)")
        if self.best_metric and not self.best_metric.startswith("eval_"):
            p.append(f"{flag('best_metric')}: {self.best_metric!r} is not an evaluation "
                     "metric; name one as the history does, e.g. eval_loss or eval_acc")
        elif self.best_metric and self.best_mode == "auto" \
                and not self.best_metric.endswith("loss"):
            p.append(f"{flag('best_mode')}: say min or max for --best-metric "
                     f"{self.best_metric} (auto is only for a metric ending in 'loss')")
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
        if self.resume not in ("auto", "never") and not self.resume.strip():
            p.append(f"{flag('resume')}: give 'auto', 'never' or a checkpoint URI")
        if not self.data_cache.strip():
            p.append(f"{flag('data_cache')}: must not be empty")
        if not self.checkpoint_dir.strip():
            p.append(f"{flag('checkpoint_dir')}: must not be empty")
        for name in ("checkpoint_dir", "data_dir") + (("resume",) if self.resume not in
                                                      ("auto", "never") else ()) + \
                (("init_from",) if self.init_from else ()):
            problem = _protocol_problem(getattr(self, name))
            if problem:
                p.append(f"{flag(name)}: {problem}")
        return p

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # Storage options may hold credentials: never written into checkpoints or logs.
        d["storage_options"] = "<redacted>" if self.storage_options else {}
        return d

    def storage_tuning(self) -> Any:
        """The storage defaults these options ask for (``storage.tune``)."""
        from ..storage import RetryPolicy, Tuning

        return Tuning(RetryPolicy(attempts=self.storage_retry_attempts,
                                  base_delay=self.storage_retry_base_delay,
                                  deadline=self.storage_retry_deadline),
                      int(self.s3_part_mb * 2**20), self.s3_concurrency)

    def digest(self) -> str:
        """SHA-256 of the whole configuration (storage options redacted), for the manifest."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


EXAMPLES = {"task_args": '{"layers": 4}', "storage_options": '{"anon": false}'}


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


class ConfigError(InputError):
    """Invalid configuration; ``problems`` lists every one of them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
