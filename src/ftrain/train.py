"""Entry point: config -> distributed setup -> build parts -> resume -> Trainer.fit().

    torchrun --nproc_per_node=4 -m src.train [options]
    python -m src.train [options]          # one process
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import exitcodes
from .checkpoint import Checkpointer, CheckpointStore, CorruptCheckpoint, Loaded, open_uri
from .config import Config, ConfigError, load_config
from .data import SPECS, DataError, build_datasets, fetch_remote_data_dir
from .distributed import Collectives, DistInfo, env_rank, ordered_mean_hook, setup, teardown
from .models import build_model, model_args
from .storage import Storage, StorageError, redact
from .trainer import Parts, StopSignals, Trainer, TrainState, init_seed, seed_all

log = logging.getLogger("ftrain.train")


class InputError(Exception):
    """Bad input (data, checkpoint, incompatible resume): exit 2 with this message."""


def setup_logging(rank: int) -> None:
    level = os.environ.get("FTT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)),
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)


# ---------------------------------------------------------------------------- parts
def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999),
                             weight_decay=cfg.weight_decay)


# State keys that depend on the run's length; on resume with other --epochs they come from
# the current run so the schedule stretches to the new end instead of running past it.
_HORIZON_KEYS = {"cosine": ("T_max",), "onecycle": ("total_steps", "_schedule_phases")}


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step_epochs * steps_per_epoch,
                                               gamma=cfg.lr_gamma)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)


def load_scheduler_state(cfg: Config, sched, saved: dict[str, Any]) -> None:
    fresh = sched.state_dict()
    saved = dict(saved)
    for key in _HORIZON_KEYS.get(cfg.scheduler, ()):
        if key in fresh and saved.get(key) != fresh[key]:  # noqa: SIM102
            log.info("LR schedule: %s changed from %s to %s (--epochs changed)", key,
                     saved.get(key) if key != "_schedule_phases" else "...",
                     fresh[key] if key != "_schedule_phases" else "...")
            saved[key] = fresh[key]
    changed = any(saved.get(k) != fresh.get(k) for k in _HORIZON_KEYS.get(cfg.scheduler, ()))
    if cfg.scheduler == "none":
        saved.pop("lr_lambdas", None)
    sched.load_state_dict(saved)
    if changed and cfg.scheduler == "cosine":
        # The recursive cosine update cannot move to a new horizon (from lr 0 it stays at 0):
        # restart it from the closed form at the current step.
        lrs = sched._get_closed_form_lr()
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = list(lrs)


# ---------------------------------------------------------------------------- resume
def compatibility_problems(cfg: Config, loaded: Loaded, margs: dict[str, Any],
                           world_size: int) -> tuple[list[str], list[str]]:
    """(refusals, allowed changes) between the checkpoint's run and this one."""
    ts, refuse, allowed = loaded.train_state, [], []
    old_cfg = ts.get("config", {})
    old_margs = ts.get("model_args") or {}
    if old_margs != margs:
        diff = sorted(k for k in {*old_margs, *margs} if old_margs.get(k) != margs.get(k))
        refuse.append(f"model ({', '.join(diff)}; set by --model/--width/--depth/--dataset): "
                      f"checkpoint has {old_margs}, this run builds {margs}")
    digest = loaded.manifest.get("config_digest") or ts.get("config_digest")
    if not old_cfg and digest and digest != cfg.digest():
        # No config recorded to compare field by field: the digest of the fields that define
        # what is trained (config.INCOMPATIBLE_FIELDS) decides.
        refuse.append(f"config digest: checkpoint {digest[:12]}, this run {cfg.digest()[:12]} "
                      "(dataset, model, width, depth, optimizer or synthetic train size differ)")
    for key in ("dataset", "optimizer", "synthetic_train_size", "scheduler"):
        if key in old_cfg and old_cfg[key] != getattr(cfg, key):
            refuse.append(f"--{key.replace('_', '-')}: checkpoint {old_cfg[key]!r}, "
                          f"now {getattr(cfg, key)!r}")
    old_batch = ts.get("global_batch_size")
    if old_batch != cfg.batch_size:
        refuse.append(f"--batch-size: checkpoint was trained with global batch {old_batch}, now "
                      f"{cfg.batch_size}; the sample sequence would change")
    if cfg.batch_size % world_size:
        refuse.append(f"world size {world_size} does not divide the global batch size "
                      f"{cfg.batch_size}; use a world size that divides it")
    if ts.get("world_size") != world_size:
        allowed.append(f"world size {ts.get('world_size')} -> {world_size} (per-rank batch "
                       f"{cfg.batch_size // world_size})")
    for key, value in cfg.to_dict().items():
        if key in old_cfg and old_cfg[key] != value and key not in (
                "dataset", "optimizer", "synthetic_train_size", "scheduler", "model", "width",
                "depth", "batch_size", "config", "resume"):
            allowed.append(f"--{key.replace('_', '-')}: {old_cfg[key]!r} -> {value!r}")
    return refuse, allowed


def choose_checkpoint(cfg: Config, store: CheckpointStore, options: dict[str, Any]) -> Loaded | None:
    """Rank 0: the checkpoint to resume from, None to start fresh; InputError to refuse."""
    if cfg.resume == "never":
        if store.step_dirs():
            raise InputError(f"--resume never, but --checkpoint-dir {cfg.checkpoint_dir} already "
                             "holds checkpoints; its steps would collide. Use an empty "
                             "--checkpoint-dir, or --resume auto to continue")
        return None
    if cfg.resume == "auto":
        if not store.committed_names():
            return None  # nothing committed; a save killed half-way is invisible by design
        loaded = store.latest()
        if loaded is None:
            raise InputError(f"--checkpoint-dir {cfg.checkpoint_dir} holds checkpoints but none "
                             "is valid (see the warnings above). Inspect them with "
                             f"`python -m src.ckpt ls {cfg.checkpoint_dir}`; to start over, use "
                             "--resume never with an empty --checkpoint-dir")
        return loaded
    if store.committed_names():
        # A restart of the same command must continue this run's own newer checkpoints, not
        # go back to the URI it started from.
        log.info("--resume %s: --checkpoint-dir %s already holds this run's checkpoints; "
                 "resuming from the newest of them instead", cfg.resume, cfg.checkpoint_dir)
        loaded = store.latest()
        if loaded is not None:
            return loaded
    other, name = open_uri(cfg.resume, options)
    try:
        loaded = other.load(name) if name else other.latest()
    except CorruptCheckpoint as e:
        raise InputError(f"--resume {cfg.resume}: invalid checkpoint: {e}") from None
    if loaded is None:
        raise InputError(f"--resume {cfg.resume}: no valid checkpoint there")
    return loaded


def apply_checkpoint(cfg: Config, loaded: Loaded, parts: Parts) -> TrainState:
    st = loaded.state
    try:
        parts.model.load_state_dict(st["model"])
        parts.optimizer.load_state_dict(st["optimizer"])
        load_scheduler_state(cfg, parts.scheduler, st["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise InputError(f"checkpoint {loaded.uri} does not fit this model/optimizer: {e}") from None
    return TrainState.from_dict(loaded.train_state)


# ---------------------------------------------------------------------------- main
@record
def main(argv: list[str] | None = None) -> int:
    rank = env_rank()
    setup_logging(rank)
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    signals = StopSignals()
    # Past the deadline for the emergency checkpoint, plus room for the evaluation that may
    # precede an epoch-end one.
    signals.install(hard_deadline_s=cfg.preemption_deadline + 30.0)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        info = setup(cfg.device, cfg.dist_timeout)
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    except RuntimeError as e:  # rendezvous/store failures: a peer or the launcher is gone
        log.error("cannot start the process group: %s; exiting %d (retryable)", str(e)[:300],
                  exitcodes.PEER_FAILED)
        return exitcodes.PEER_FAILED
    try:
        return _run(cfg, info, signals)
    except InputError as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return exitcodes.INVALID
    except StorageError as e:
        if info.is_main:
            print(f"error: {e}; exiting {exitcodes.STORAGE_FAILED} (retryable): rerun once "
                  "storage is reachable", file=sys.stderr)
        return exitcodes.STORAGE_FAILED
    except KeyboardInterrupt:
        log.warning("interrupted twice: exiting without a checkpoint")
        return exitcodes.INTERRUPTED
    except RuntimeError as e:  # torch.distributed.DistError is one
        # A peer may die at any moment, during start-up and resume as well as in training.
        text = str(e)
        if not isinstance(e, torch.distributed.DistError) and not any(
                s in text for s in ("Connection closed by peer", "Gloo", "gloo", "NCCL",
                                    "Connection reset")):
            raise
        log.error("a peer failed or a collective timed out: %s; exiting %d (retryable)",
                  text[:300], exitcodes.PEER_FAILED)
        return exitcodes.PEER_FAILED
    finally:
        teardown()


def _node_local_copy(url: str, info: DistInfo, coll: Collectives, options: dict[str, Any]) -> str:
    """Local rank 0 fetches a remote --data-dir into the node's cache; the others wait."""
    cache = os.path.abspath(os.environ.get("FTT_DATA_CACHE", ".data-cache"))
    error = None
    if info.local_rank == 0:
        try:
            fetch_remote_data_dir(url, cache, options)
        except (DataError, StorageError, OSError) as e:
            error = e
    coll.barrier()
    if error is not None:
        raise error
    return fetch_remote_data_dir(url, cache, options)  # cached now: returns at once


def _run(cfg: Config, info: DistInfo, signals: StopSignals) -> int:
    coll = Collectives(info)
    options = cfg.storage_options_dict()

    # ---- data (bad input: exit 2 on every rank; storage outage: 140)
    error: tuple[str, str] | None = None
    try:
        data_dir = cfg.data_dir
        if "://" in data_dir and cfg.dataset != "synthetic":
            data_dir = _node_local_copy(cfg.data_dir, info, coll, options)
        if cfg.download and info.is_distributed and cfg.dataset != "synthetic":
            # One download per node; the others read what it fetched. The barrier is reached
            # whatever happens, so a failed download cannot leave the ranks in other collectives.
            download_error = None
            if info.local_rank == 0:
                try:
                    build_datasets(cfg.dataset, data_dir, True, cfg.seed, 1, 1)
                except (DataError, OSError) as e:
                    download_error = e
            coll.barrier()
            if download_error is not None:
                raise download_error
        train_set, test_set = build_datasets(cfg.dataset, data_dir, cfg.download, cfg.seed,
                                             cfg.synthetic_train_size, cfg.synthetic_test_size)
    except StorageError as e:
        error = ("storage", f"--data-dir {cfg.data_dir}: {e}")
    except (DataError, OSError) as e:
        error = ("input", str(e))
    errors = coll.gather_objects(error) if info.is_distributed else [error]
    found = [e for e in errors if e is not None]
    if found:
        kind, text = next((e for e in found if e[0] == "input"), found[0])
        raise (StorageError if kind == "storage" else InputError)(text)

    # ---- model, optimizer, scheduler (seeded before the model exists)
    spec = SPECS[cfg.dataset]
    margs = model_args(cfg.model, spec.in_channels, spec.image_size, spec.num_classes, cfg.width,
                       cfg.depth)
    seed_all(init_seed(cfg.seed))
    model = build_model(margs).to(info.device)
    optimizer = build_optimizer(cfg, model)  # after the model is on its device
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise InputError(f"--batch-size {cfg.batch_size} exceeds the {len(train_set)} training "
                         "samples")
    if cfg.batch_size % info.world_size:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the world size "
                         f"{info.world_size}; pick a multiple of it")
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    parts = Parts(model, model, optimizer, scheduler, train_set, test_set, margs)

    # ---- resume: rank 0 picks and checks; every rank loads the same checkpoint
    store = CheckpointStore(Storage(cfg.checkpoint_dir, options))
    choice: dict[str, Any] = {"name": None, "uri": None, "error": None}
    if info.is_main:
        try:
            try:
                store.probe_writable()
            except StorageError as e:
                # Transient trouble is the saves' business (retried, counted, exit 140); only
                # a folder we may never write to is bad input.
                log.warning("--checkpoint-dir %s: write probe failed (%s); continuing",
                            cfg.checkpoint_dir, e)
            loaded = choose_checkpoint(cfg, store, options)
            if loaded is not None:
                refuse, allowed = compatibility_problems(cfg, loaded, margs, info.world_size)
                if refuse:
                    raise InputError(f"cannot resume from {loaded.uri}: it is incompatible with "
                                     "this run:\n  " + "\n  ".join(refuse) + "\nUse the original "
                                     "settings, or --resume never with a new --checkpoint-dir")
                for change in allowed:
                    log.info("resume: allowed change: %s", change)
                choice = {"name": loaded.name, "uri": loaded.uri, "error": None}
        except InputError as e:
            choice["error"] = str(e)
        except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            choice["error"] = (f"--checkpoint-dir {cfg.checkpoint_dir}: cannot write there "
                               f"({type(e).__name__}: {redact(str(e))[:200]}); fix the "
                               "permissions or pick another folder")
        except StorageError as e:  # unreachable is not invalid: retryable, not exit 2
            choice["error"], choice["storage"] = f"checkpoint storage failed: {e}", True
    else:
        loaded = None
    choice = coll.broadcast_object(choice)
    if choice["error"]:
        raise (StorageError if choice.get("storage") else InputError)(choice["error"])
    state = TrainState()
    if choice["uri"]:
        if not info.is_main:
            try:
                loaded = open_uri(choice["uri"], options)[0].load(choice["name"])
            except CorruptCheckpoint as e:
                raise InputError(f"rank {info.rank} cannot load {choice['uri']}: {e}") from None
            except StorageError as e:  # unreachable is not invalid: retryable
                raise StorageError(f"rank {info.rank} cannot read {choice['uri']}: {e}") from None
        state = apply_checkpoint(cfg, loaded, parts)
        if info.is_main:
            log.info("resumed from %s: %d epochs done, step %d, batch %d of epoch %d",
                     choice["uri"], state.epoch, state.step, state.batch_in_epoch, state.epoch + 1)
        del loaded
    if not coll.all_equal(state.step):
        raise InputError("ranks resumed at different steps; checkpoint storage is inconsistent "
                         "between nodes")

    if state.epoch >= cfg.epochs:
        if info.is_main:
            print(f"training already complete: {state.epoch}/{cfg.epochs} epochs, step "
                  f"{state.step} ({choice['uri']}); nothing to do. Raise --epochs to continue.",
                  flush=True)
        return exitcodes.OK
    if cfg.max_steps and state.step >= cfg.max_steps:
        if info.is_main:
            print(f"already at step {state.step} >= --max-steps {cfg.max_steps}; nothing to do",
                  flush=True)
        return exitcodes.OK

    if info.is_distributed:
        parts.ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        if info.device.type == "cpu" or cfg.deterministic:  # exact resume (see the hook)
            parts.ddp.register_comm_hook(None, ordered_mean_hook)
    checkpointer = Checkpointer(store, cfg.keep_last, cfg.orphan_grace_seconds) \
        if info.is_main else None
    if info.is_main:
        log.info("training %s/%s on %d x %s (%s), global batch %d, %d steps/epoch, checkpoints "
                 "in %s", cfg.model, cfg.dataset, info.world_size, info.device.type,
                 info.backend or "single process", cfg.batch_size, steps_per_epoch,
                 cfg.checkpoint_dir)
    trainer = Trainer(cfg, info, coll, parts, state, checkpointer, signals)
    try:
        code = trainer.fit()  # a peer failure propagates to main(): exit PEER_FAILED
    finally:
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()
    return code


def cli() -> None:
    """Console script ``ftrain-train`` and ``python -m ftrain.train`` / ``src.train``."""
    code = exitcodes.FAILED  # an exception escaping main() is a bug (torchrun records it)
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, unknown flag
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        exitcodes.record(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
