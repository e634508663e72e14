"""Watching a running job: the heartbeat file, rank 0's Prometheus metrics, TensorBoard scalars,
the progress bar and JSON log lines.

The trainer tells the Monitor what happened (a step, a logged step, an epoch); each outlet that
is switched on takes what it needs. Nothing here runs a collective or syncs the device: the
values come from what the trainer already has on the host. Every outlet is off by default.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from ..config import Config
from .distributed import DistInfo
from .exitcodes import InputError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- log lines
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, rank, logger, message, and the structured fields
    a call passed as ``extra={"fields": {...}}``."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname, "rank": self.rank, "logger": record.name,
            "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(rank: int, fmt: str = "text", level: str | None = None) -> None:
    """Rank 0 logs at ``level`` (--log-level; before the options are read: FTT_LOG_LEVEL, else
    INFO), the others at WARNING and above, or, when it is DEBUG, at DEBUG as well (what each
    rank does, its memory: memory.py); ``fmt`` 'text' (time, rank, level, message) or 'json'
    (JsonFormatter)."""
    level = (level or os.environ.get("FTT_LOG_LEVEL") or "INFO").upper()
    if rank and level != "DEBUG":
        level = logging.getLevelName(max(logging.WARNING, logging.getLevelName(level)))
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(rank))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def wants_json(argv: list[str] | None) -> bool:
    """Whether the command line or environment asks for JSON logs, before the config is
    parsed (so that a config error is reported in the format the collector expects)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == "--log-format" and i + 1 < len(args):
            return args[i + 1] == "json"
        if a.startswith("--log-format="):
            return a.split("=", 1)[1] == "json"
    return os.environ.get("FTT_LOG_FORMAT", "") == "json"


def say_error(text: str, fmt: str) -> None:
    """A fatal error for the user, on stderr: ``error: ...`` or, with JSON logs, one object."""
    if fmt == "json":
        logging.getLogger("ftrain.train").error("error: %s", text)
    else:
        print(f"error: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """A file created at start-up and whose modification time is set by the beats: a liveness
    probe fails when it grows older than the longest a step (or an evaluation) may take. A
    beat within INTERVAL_S of the last one that touched the file does nothing: a small
    model's thousands of steps a second would otherwise each pay a system call."""

    INTERVAL_S = 0.2

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._touched = time.monotonic()
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "w") as fh:
                fh.write(f"{os.getpid()}\n")
        except OSError as e:
            raise InputError(f"--heartbeat-file {path}: cannot create it ({e.strerror}); "
                             "point it at a writable folder") from None

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._touched < self.INTERVAL_S:
            return
        self._touched = now
        try:
            os.utime(self.path)
        except FileNotFoundError:  # removed under us: recreate it
            with open(self.path, "w") as fh:
                fh.write(f"{os.getpid()}\n")


# ---------------------------------------------------------------------------- metrics
class Live:
    """The values the outlets read, updated by the trainer on the host (no device sync)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0  # the epoch being trained, 1-based
        self.metrics: dict[str, float] = {}  # the newest logged step's, over the global batch
        self.lr = 0.0
        self.samples_per_s = 0.0
        self.resumes = 0
        self.started = time.time()


class _Collector:
    """Builds the metric families at each scrape from the Live values and the saver's counts."""

    def __init__(self, live: Live, saver: Any) -> None:
        self.live, self.saver = live, saver

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        live, ckpt = self.live, getattr(self.saver, "ckpt", None)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"ftrain_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"ftrain_{name}", doc, value=value)

        yield gauge("step", "Global optimizer steps completed.", live.step)
        yield gauge("epoch", "The epoch being trained (1-based).", live.epoch)
        if "loss" in live.metrics:
            yield gauge("loss", "Training loss of the newest logged step (the global batch).",
                        live.metrics["loss"])
        train = GaugeMetricFamily("ftrain_train_metric", "The task's training metrics of the "
                                  "newest logged step (the global batch).", labels=["name"])
        for name, value in live.metrics.items():
            train.add_metric([name], value)
        yield train
        yield gauge("learning_rate", "Learning rate of the first parameter group.", live.lr)
        yield gauge("samples_per_second", "Global training throughput over the newest logging "
                    "interval.", live.samples_per_s)
        last_commit = ckpt.last_commit_time if ckpt is not None and ckpt.last_commit_time else None
        yield gauge("seconds_since_last_checkpoint", "Seconds since the newest checkpoint "
                    "this process committed (since start-up before the first): the work a crash "
                    "would lose now.", time.time() - (last_commit or live.started))
        yield gauge("last_checkpoint_step", "Step of the newest checkpoint committed by this "
                    "process (-1: none yet).",
                    ckpt.last_committed_step if ckpt is not None and
                    ckpt.last_committed_step is not None else -1)
        yield gauge("save_stall_seconds", "Time the newest save held the training loop (the "
                    "snapshot copy).", ckpt.last_stall_s if ckpt is not None else 0.0)
        yield gauge("save_persist_seconds", "Duration of the newest finished background "
                    "persist (serialize, write, commit).",
                    ckpt.last_persist_s if ckpt is not None else 0.0)
        yield counter("saves_committed", "Checkpoints committed by this process.",
                      ckpt.committed if ckpt is not None else 0)
        yield counter("saves_dropped", "Snapshots superseded by newer ones before storage took "
                      "them.", ckpt.dropped if ckpt is not None else 0)
        yield counter("saves_failed", "Checkpoint saves that failed (after the storage "
                      "retries).", ckpt.failed if ckpt is not None else 0)
        yield counter("resumes", "Times this run was resumed from a checkpoint (restarts).",
                      live.resumes)


def serve_metrics(port: int, live: Live, saver: Any) -> Any:
    """Start the /metrics endpoint on ``port`` (all interfaces); returns the server."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise InputError("--metrics-port needs the prometheus-client package: pip install "
                         "prometheus-client (or reinstall ftrain)") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(live, saver))
    try:
        server, _thread = start_http_server(port, registry=registry)
    except OSError as e:
        raise InputError(f"--metrics-port {port}: cannot listen on it ({e.strerror}); pick a "
                         "free port, or 0 to turn the metrics off") from None
    log.info("metrics on http://0.0.0.0:%d/metrics", port)
    return server


# ---------------------------------------------------------------------------- tensorboard
def tensorboard_writer(folder: str, resumed_step: int | None) -> Any:
    """A SummaryWriter into ``folder``. After a resume at step S, the events an earlier attempt
    wrote past S (steps it trained again) are purged: TensorBoard shows each step once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install "
                         "'ftrain[tensorboard]' (or pip install tensorboard)") from None
    folder = folder[len("file://"):] if folder.startswith("file://") else folder
    try:
        os.makedirs(folder, exist_ok=True)
        return SummaryWriter(folder, purge_step=None if resumed_step is None
                             else resumed_step + 1)
    except OSError as e:
        raise InputError(f"--tensorboard {folder}: cannot write there ({e.strerror}); point "
                         "it at a writable local folder") from None


# ---------------------------------------------------------------------------- the monitor
class Monitor:
    """What the trainer reports to: heartbeat (each node's local rank 0), metrics, TensorBoard
    and the progress bar (rank 0)."""

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        """At start-up: the heartbeat file exists from here on."""
        self.cfg = cfg
        self.live = Live()
        self.heartbeat = Heartbeat(cfg.heartbeat_file) \
            if cfg.heartbeat_file and info.local_rank == 0 else None
        self._server = None
        self._tb = None
        self._saver = self._tracking = None
        self._bar = None
        self._redirect = None
        self.main = info.is_main
        self.use_bar = (self.main and cfg.log_format == "text" and sys.stderr.isatty()
                        and cfg.progress != "off")

    def attach(self, saver: Any, resumes: int, resumed_step: int | None,
               tracking: Any = None) -> None:
        """Once the run is resumed and its saver exists: rank 0 starts the metrics endpoint and
        the TensorBoard writer, and publishes to its tracker (tracking.py); the other ranks
        keep a shadow of its points (for a survivor's checkpoint when rank 0 died)."""
        self.live.resumes = resumes
        if tracking is not None:
            saver.tracker_published = tracking.durable
        elif not self.main and self.cfg.tracker != "none":
            from .tracking import Shadow

            tracking = Shadow()
        self._saver, self._tracking = saver, tracking
        if resumed_step is not None:
            self.live.step = resumed_step
        if not self.main:
            return
        if self.cfg.metrics_port:
            self._server = serve_metrics(self.cfg.metrics_port, self.live, saver)
        if self.cfg.tensorboard:
            self._tb = tensorboard_writer(self.cfg.tensorboard, resumed_step)

    @property
    def keeps_points(self) -> bool:
        """Whether the logged figures go anywhere on this rank: rank 0, or another rank
        keeping its tracker's shadow."""
        return self.main or self._tracking is not None

    @property
    def bar_active(self) -> bool:
        """A progress bar shows the periodic figures: no periodic log lines then."""
        return self._bar is not None

    def beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()

    def start_epoch(self, epoch: int, epochs: int, done: int, total: int) -> None:
        self.live.epoch = epoch + 1
        if self.use_bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            try:  # a terminal that reports no size (0 columns) would get an empty bar
                known = os.get_terminal_size(sys.stderr.fileno()).columns > 0
            except OSError:
                known = False
            self._bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                             unit="step", leave=False, file=sys.stderr, dynamic_ncols=known,
                             ncols=None if known else shutil.get_terminal_size().columns,
                             nrows=None if known else shutil.get_terminal_size().lines)

    def step(self, step: int) -> None:
        """Every step, on every rank: cheap (a counter; the heartbeat rank's file touched at most
        five times a second)."""
        self.live.step = step
        if self.heartbeat is not None:
            self.heartbeat.beat()
        if self._bar is not None:
            self._bar.update(1)
        if self._tracking is not None:  # rank 0: a commit since the last step publishes
            self._tracking.publish_upto(self._saver.last_committed_step if self.main
                                        else self._saver.agreed_published)

    def outbox(self) -> list:
        """Points made and not yet published, for the checkpoint being taken (rank 0; another
        rank's shadow of them)."""
        return self._tracking.outbox() if self._tracking is not None else []

    def evaluated(self, entry: dict[str, Any]) -> None:
        """Every rank: an evaluation inside an epoch (--eval-every-steps)."""
        if self._tracking is not None:
            self._tracking.add(entry["step"], {f"eval/{k[5:]}": v for k, v in entry.items()
                                               if k.startswith("eval_")})

    def logged(self, step: int, metrics: dict[str, float], lr: float,
               samples_per_s: float) -> None:
        """Every rank, every --log-every-steps steps, with the figures it just computed."""
        live = self.live
        live.metrics, live.lr, live.samples_per_s = dict(metrics), lr, samples_per_s
        if self._bar is not None:
            self._bar.set_postfix({**{k: f"{v:.4f}" for k, v in metrics.items()},
                                   "lr": f"{lr:.3g}", "samples/s": f"{samples_per_s:.0f}"},
                                  refresh=False)
        if self._tracking is not None:
            self._tracking.add(step, {**{f"train/{k}": v for k, v in metrics.items()},
                                      "train/lr": lr, "train/samples_per_s": samples_per_s})
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"train/{name}", value, step)
            self._tb.add_scalar("train/lr", lr, step)
            self._tb.add_scalar("train/samples_per_s", samples_per_s, step)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def epoch_done(self, entry: dict[str, Any]) -> None:
        """Every rank: an epoch's history entry (train_*, eval_*, lr, samples_per_s, ...)."""
        if self._tracking is not None:
            self._tracking.add(entry["step"], {f"epoch/{k}": v for k, v in entry.items()
                                               if k not in ("epoch", "step")
                                               and isinstance(v, (int, float))})
        if self._tb is None:
            return
        for key, value in entry.items():
            if key in ("epoch", "step") or not isinstance(value, (int, float)):
                continue
            self._tb.add_scalar(f"epoch/{key}", value, entry["step"])
        self._tb.flush()

    def close(self, status: str = "FINISHED") -> None:
        """``status``: how the run ends, for the tracker (FINISHED, KILLED: a retryable stop,
        FAILED). What committed is published first."""
        self.end_epoch()
        if self._tracking is not None:
            tracking, self._tracking = self._tracking, None
            try:
                tracking.publish_upto(self._saver.last_committed_step)
                tracking.close(status)
            except Exception as e:  # noqa: BLE001 - a tracker must not change the exit code
                log.warning("%s: closing the run failed: %s", self.cfg.tracker, e)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
