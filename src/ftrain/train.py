"""Entry point: config -> distributed setup -> task -> data -> parts -> resume -> Trainer.fit().

    torchrun --nproc_per_node=4 -m ftrain.train [options]   (or -m src.train from a checkout)
    python -m ftrain.train [options]                        # one process
    ftrain.fit(task, config)                                # from Python (api.py)

It wires the parts together and holds no policy: the task builds the model, data and loss
(tasks/), which checkpoint to resume and what may change is checkpoint/resume.py's and
rules.py's, the save policy checkpoint/policy.py's, stopping core/control.py's and the loop
core/loop.py's.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import traceback
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import storage
from .api import FitResult
from .checkpoint import Checkpointer, CheckpointStore, ShardedCheckpointer, resume, rules
from .checkpoint.best import Selection
from .checkpoint.format import TrainState
from .checkpoint.plain import load_plain
from .checkpoint.policy import SavePolicy
from .config import Config, ConfigError, load_config
from .core.loop import Parts, Trainer
from .core.rng import SEEDS_DOC, init_seed, seed_all
from .data.fingerprint import fingerprint
from .data.prepare import task_datasets
from .errors import InputError, Interrupted, PeerFailed, Preempted
from .runtime import exitcodes, fsdp
from .runtime.control import StopSignals, hard_exit
from .runtime.distributed import (
    Collectives,
    DistInfo,
    env_rank,
    peer_failure,
    setup,
    teardown,
)
from .runtime.exchange import StepExchange
from .runtime.memory import PeakRss
from .runtime.monitor import Monitor, say_error, setup_logging, wants_json
from .runtime.numerics import compile_cache_per_capability, numeric_environment
from .runtime.tracking import open_tracking
from .storage import Storage, StorageAccessError, StorageError
from .tasks import (
    Task,
    TaskError,
    TaskRef,
    load_task,
    task_ref,
)
from .tasks.declarations import check_declarations, check_scheduler

log = logging.getLogger("ftrain.train")


def run(cfg: Config, info: DistInfo, signals: StopSignals, task: Task | None = None
        ) -> FitResult:
    """Train ``cfg`` on an initialised process group (or a single process). ``task``: an
    already built task (``ftrain.fit``); otherwise it is imported from ``cfg.task``."""
    coll = Collectives(info)
    monitor = Monitor(cfg, info)  # the heartbeat file exists from here on
    status = "FAILED"  # for a tracker's run
    try:
        result = _run(cfg, info, coll, signals, task, monitor)
        status = "FINISHED"
        return result
    except (Preempted, Interrupted, StorageError, PeerFailed):
        status = "KILLED"  # retryable: the restart sets it running again
        raise
    finally:
        monitor.close(status)


def _run(cfg: Config, info: DistInfo, coll: Collectives, signals: StopSignals,
         task: Task | None, monitor: Monitor) -> FitResult:
    options = dict(cfg.storage_options)
    ref = task_ref(cfg)
    try:
        if task is None:
            task = load_task(ref)
        check_declarations(task)
    except TaskError as e:
        raise InputError(str(e)) from None
    train_set, test_set = task_datasets(cfg, info, coll, task, options)
    facts = None
    if info.is_main:
        data = {"train": fingerprint(train_set, cfg.seed), "eval": fingerprint(test_set, cfg.seed)}
        facts = rules.run_facts(cfg, ref, task, info.world_size, data,
                                 numeric_environment(info.device))

    # ---- model, optimizer, scheduler (seeded before the model exists)
    seed_all(init_seed(cfg.seed))
    if cfg.parallel == "fsdp":  # built on the meta device, sharded, then initialised
        model = fsdp.build_model(task, init_seed(cfg.seed), info)
    else:
        model = task.build_model().to(info.device)
    optimizer = task.configure_optimizer(model, cfg)  # after the model is on its device
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"--batch-size {cfg.batch_size} exceeds the {len(train_set)} training "
                         "samples")
    if cfg.batch_size % info.world_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the world size "
                         f"{info.world_size}; pick a multiple of it")
    if (cfg.batch_size // info.world_size) % cfg.grad_accum:
        raise InputError(f"--grad-accum {cfg.grad_accum} does not divide the per-rank batch "
                         f"{cfg.batch_size // info.world_size} (--batch-size {cfg.batch_size} / "
                         f"{info.world_size} ranks); pick a divisor of it")
    scheduler = task.configure_scheduler(optimizer, cfg, steps_per_epoch)
    try:
        check_scheduler(task, scheduler)
    except TaskError as e:
        raise InputError(str(e)) from None
    if facts is not None:
        facts.update(rules.optimizer_facts(task, optimizer, scheduler))
    scaler = torch.amp.GradScaler(info.device.type) if cfg.precision == "fp16" else None
    custom_scheduler = type(task).configure_scheduler is not Task.configure_scheduler

    # ---- resume: rank 0 picks and checks; every rank loads the same checkpoint
    store = CheckpointStore(Storage(cfg.checkpoint_dir, options))
    memory = PeakRss(log.isEnabledFor(logging.DEBUG))  # the resume's peak RSS, at DEBUG
    memory.start("resume")
    plain = None
    if cfg.init_from and info.is_main:  # its digest is a fact of the run, compared on resume
        plain = load_plain(cfg.init_from, options)
        facts["init_from"] = {"uri": cfg.init_from, "digest": plain.digest}
    choice, loaded = resume.resume(cfg, info, coll, store, options, facts)
    state = TrainState()
    resumed = loaded is not None
    tracked = None  # the resumed checkpoint's tracker run and unpublished points
    if loaded is not None:
        tracked = {k: v for k, v in loaded.train_state.items() if k.startswith("tracker")}
        resume.load_state(cfg, loaded, model, optimizer, scheduler, task, choice["applied"],
                          custom_scheduler, scaler)
        state = TrainState.from_dict(loaded.train_state)
        state.resumes += 1
        state.not_bitwise += [f"resumed at step {state.step}: {change}"
                              for change in choice["numerics"]]
        if info.is_main:
            log.info("resumed from %s: %d epochs done, step %d, batch %d of epoch %d",
                     choice["uri"], state.epoch, state.step, state.batch_in_epoch,
                     state.epoch + 1,
                     extra={"fields": {"event": "resumed", "uri": choice["uri"],
                                       "step": state.step, "epoch": state.epoch,
                                       "batch_in_epoch": state.batch_in_epoch}})
        del loaded
        memory.log("resume", f"resume from step {state.step}", log)
    elif cfg.init_from:
        plain = plain or load_plain(cfg.init_from, options)
        state = resume.start_from_plain(cfg, plain, model, optimizer, scheduler,
                                        steps_per_epoch, info.is_main)
    del plain
    if not coll.all_equal(state.step):
        raise InputError("ranks resumed at different steps; checkpoint storage is inconsistent "
                         "between nodes")

    if state.epoch >= cfg.epochs:
        if info.is_main:
            print(f"training already complete: {state.epoch}/{cfg.epochs} epochs, step "
                  f"{state.step} ({choice['uri']}); nothing to do. Raise --epochs to continue.",
                  flush=True)
        return FitResult(state.step, state.epoch, state.history, choice["uri"], state)
    if cfg.max_steps and state.step >= cfg.max_steps:
        if info.is_main:
            print(f"already at step {state.step} >= --max-steps {cfg.max_steps}; nothing to do",
                  flush=True)
        return FitResult(state.step, state.epoch, state.history, choice["uri"], state)

    # --compile: what the training step runs is compiled; the model itself (what checkpoints,
    # evaluation and the tools see) is not, so its state_dict keys stay the model's own (no
    # "_orig_mod." prefix): a compiled run and a plain one read each other's checkpoints.
    if cfg.compile != "off" and info.device.type == "cpu":
        compile_cache_per_capability()
    ddp: torch.nn.Module = model if cfg.compile == "off" else torch.compile(
        model, mode=None if cfg.compile == "default" else cfg.compile)
    # At world size 1 there is nothing to all-reduce: DDP's hooks would only cost time (47% of
    # a small CNN's step on an H100); the gradients are bitwise the same without them.
    # Under fsdp the model is its own wrapper (FSDP2 reduce-scatters the gradients).
    exchange = None
    if info.is_distributed and info.world_size > 1 and cfg.parallel == "ddp":
        # On CPU and under --deterministic the gradients travel through StepExchange: a mean
        # that a resume reproduces bit for bit (on CPU an all-reduce on a pinned bucket
        # layout, on GPU the mean in rank order). On CPU the step's metric sums and rank 0's
        # buffers (which DDP would broadcast at the next forward pass) go with them, so that a
        # survivor holds the whole state of the newest step. Not yet on GPU: a dead peer hangs
        # NCCL, and what the device has executed is not what the host has queued (unverified).
        cpu = info.device.type == "cpu"
        hook = StepExchange(model, "allreduce" if cpu else "gather") if (
            cpu or cfg.deterministic) else None
        if hook is not None and cpu:
            exchange = hook
        ddp = torch.nn.parallel.DistributedDataParallel(
            ddp, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            **(_no_forward_buffer_sync() if exchange is not None else {}))
        if hook is not None:
            ddp.register_comm_hook(None, hook.hook)
    checkpointer: Checkpointer | None = None
    if cfg.parallel == "fsdp":
        # Every rank persists its shards; the persisters agree among themselves on a gloo
        # group of their own (created by every rank, in the same order).
        group = torch.distributed.new_group(backend="gloo") if info.is_distributed else None
        checkpointer = ShardedCheckpointer(store, cfg.keep_last, cfg.orphan_grace_seconds,
                                           group, info.is_main, info.world_size,
                                           Selection.from_config(cfg))
    elif info.is_main:
        checkpointer = Checkpointer(store, cfg.keep_last, cfg.orphan_grace_seconds,
                                    Selection.from_config(cfg))
    meta = _checkpoint_meta(cfg, info, ref, task, facts, steps_per_epoch)
    tracking = open_tracking(cfg, store.storage, ref.args, tracked, state.resumes,
                             state.step) if info.is_main else None
    if tracking is not None:
        meta["tracker"] = tracking.record
    if exchange is not None:
        # Rank 0's facts (data digests, numerics, the tracker's run) on every rank: a survivor
        # that checkpoints after rank 0 died records the same as rank 0 would.
        meta = coll.broadcast_object(meta)
    saver = SavePolicy(cfg, info, coll, checkpointer, store, model, optimizer, scheduler, task,
                       meta, signals, scaler)
    if info.is_main:
        log.info("training %s on %d x %s (%s), global batch %d, %d steps/epoch, checkpoints "
                 "in %s", _describe(ref), info.world_size, info.device.type,
                 info.backend or "single process", cfg.batch_size, steps_per_epoch,
                 cfg.checkpoint_dir)
    monitor.attach(saver, state.resumes, state.step if resumed else None, tracking)
    parts = Parts(model, ddp, optimizer, scheduler, train_set, test_set, scaler, exchange)
    trainer = Trainer(cfg, info, coll, task, parts, state, saver, monitor)
    try:
        trainer.fit()  # a peer failure propagates to train(): PeerFailed
    finally:
        saver.close()
    return FitResult(state.step, state.epoch, state.history, saver.checkpoint_uri(state.step),
                     state)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's flag that keeps it from broadcasting rank 0's buffers at every forward pass:
    ``forward_sync_buffers`` since torch 2.13 (``broadcast_buffers`` is deprecated there),
    ``broadcast_buffers`` before."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
            else {"broadcast_buffers": False})


def _describe(ref: TaskRef) -> str:
    return f"{ref.target} {json.dumps(ref.args, sort_keys=True)}" if ref.args else ref.target


def _checkpoint_meta(cfg: Config, info: DistInfo, ref: TaskRef, task: Task,
                     facts: dict[str, Any] | None, steps_per_epoch: int) -> dict[str, Any]:
    """The run's fixed facts, recorded in every checkpoint (rank 0)."""
    meta: dict[str, Any] = {
        "seed": cfg.seed, "world_size": info.world_size, "global_batch_size": cfg.batch_size,
        "steps_per_epoch": steps_per_epoch, "config": cfg.to_dict(),
        "config_digest": cfg.digest(), "task": ref.to_dict(), "run": facts,
        "seeds": {"base": cfg.seed, "init": init_seed(cfg.seed), **SEEDS_DOC}}
    described = task.describe_model()
    if described:  # for ckpt inspect
        meta["model_args"] = described
    return meta


# ---------------------------------------------------------------------------- training
def train(cfg: Config, signals: StopSignals, task: Task | None) -> FitResult:
    """Set up the process group, train, tear it down. Raises the errors fit() documents."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    previous = storage.tune(cfg.storage_tuning())
    try:
        return _train_tuned(cfg, signals, task)
    finally:
        storage.tune(previous)


def _train_tuned(cfg: Config, signals: StopSignals, task: Task | None) -> FitResult:
    try:
        info = setup(cfg.device, cfg.dist_timeout)
    except ValueError as e:
        raise InputError(str(e)) from None
    except RuntimeError as e:  # rendezvous/store failures: a peer or the launcher is gone
        raise PeerFailed(f"cannot start the process group: {str(e)[:300]}") from e
    try:
        return run(cfg, info, signals, task)
    except RuntimeError as e:  # torch.distributed.DistError is one
        # A peer may die at any moment, during start-up and resume as well as in training
        # (where the loop checkpoints the newest step first: Trainer.fit).
        if not peer_failure(e):
            raise
        raise PeerFailed(f"a peer failed or a collective timed out: {str(e)[:300]}") from e
    finally:
        teardown()


# ---------------------------------------------------------------------------- command line
@record
def main(argv: list[str] | None = None) -> int:
    """The command line: a FitResult is exit 0, each error its exit code (ftrain.errors)."""
    rank = env_rank()
    fmt = "json" if wants_json(argv) else "text"
    setup_logging(rank, fmt)
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        if rank == 0:
            say_error(str(e), fmt)
        return exitcodes.INVALID
    # --log-format and --log-level may come from the --config file or the environment.
    setup_logging(rank, cfg.log_format, cfg.log_level)
    signals = StopSignals()
    # Past the deadline for the emergency checkpoint, plus room for the evaluation that may
    # precede an epoch-end one.
    signals.install(hard_deadline_s=cfg.preemption_deadline + 30.0)
    # `kill -USR1 <worker pid>`: every thread's Python stack on stderr, and training goes on
    # (for a job that seems stuck: in a collective, a storage call, a lock).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        train(cfg, signals, None)
        return exitcodes.OK
    except (Preempted, Interrupted) as e:
        if e.abandoned:
            # The emergency write goes on in a thread that the interpreter's shutdown would
            # wait for; a partial checkpoint is invisible (no manifest): leave now.
            hard_exit(e.exit_code)
        return e.exit_code
    except (InputError, StorageAccessError) as e:
        if rank == 0:
            say_error(str(e), cfg.log_format)
        return exitcodes.INVALID
    except StorageError as e:
        if rank == 0:
            say_error(f"{e}; exiting {exitcodes.STORAGE_FAILED} (retryable): rerun once "
                      "storage is reachable", cfg.log_format)
        return exitcodes.STORAGE_FAILED
    except PeerFailed as e:
        log.error("%s; exiting %d (retryable)", e, exitcodes.PEER_FAILED)
        return exitcodes.PEER_FAILED
    except KeyboardInterrupt:
        log.warning("interrupted twice: exiting without a checkpoint")
        return exitcodes.INTERRUPTED


def cli() -> None:
    """Console script ``ftrain-train`` and ``python -m ftrain.train`` / ``src.train``."""
    code = exitcodes.FAILED
    try:
        code = main()
        if code is None:  # torch's @record returns None for SystemExit(0): argparse's --help
            code = exitcodes.OK
    except SystemExit as e:  # argparse: an unknown flag
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    except Exception:
        # A bug (ours or the task's) or a broken environment; @record has written torchrun's
        # error file. Exit 1 through exit_now, like every other exit: the interpreter's own
        # teardown can meet a gloo thread that still holds a collective's tensors and abort
        # (SIGABRT, 134 from a shell: a retryable code) instead of exiting 1.
        traceback.print_exc()
    finally:
        exitcodes.record(code)
    exitcodes.exit_now(code)


if __name__ == "__main__":
    cli()
