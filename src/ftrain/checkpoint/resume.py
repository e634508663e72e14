"""Resume: which checkpoint a run continues (rank 0 chooses and checks it against rules.py;
every rank loads the same one), and loading it into the model, optimizer and schedule."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import Config
from ..runtime.distributed import Collectives, DistInfo
from ..runtime.exitcodes import InputError
from ..storage import StorageAccessError, StorageError, redact
from ..tasks import Task
from . import rules
from .format import CorruptCheckpoint, Loaded, TrainState
from .plain import Plain
from .store import CheckpointStore, open_uri

log = logging.getLogger(__name__)


def resume(cfg: Config, info: DistInfo, coll: Collectives, store: CheckpointStore,
            options: dict[str, Any], facts: dict[str, Any] | None
            ) -> tuple[dict[str, Any], Any]:
    """Rank 0 picks and checks the checkpoint; every rank loads the same one.
    Returns (the choice every rank agreed on, the loaded checkpoint or None).

    A sharded checkpoint's shard files are verified by all ranks together (each checks its
    share of the files' checksums; they agree on the result): one with a missing or corrupt
    shard is skipped as a whole, with a warning naming the file, and the choice is made again
    without it. On remote storage each rank keeps the bytes it verified for the load: at the
    same world size a rank verifies the very shard file it loads, downloaded once."""
    skip: set[str] = set()
    while True:
        choice, loaded = _choose(cfg, info, coll, store, options, facts, skip)
        if loaded is None or not loaded.sharded:
            return choice, loaded
        files = sorted(loaded.manifest.shards)
        problem = CheckpointStore(loaded.storage).verify_files(
            loaded.name, loaded.manifest, files[info.rank::info.world_size],
            keep=loaded.verified)
        problems = [p for p in coll.gather_objects(problem or None) if p]
        if not problems:
            return choice, loaded
        if info.is_main:
            log.warning("SKIPPING checkpoint %s: %s", choice["uri"], problems[0])
        if choice["explicit"]:
            raise InputError(f"--resume {cfg.resume}: invalid checkpoint: {problems[0]}")
        skip.add(choice["uri"])


def _choose(cfg: Config, info: DistInfo, coll: Collectives, store: CheckpointStore,
            options: dict[str, Any], facts: dict[str, Any] | None, skip: set[str]
            ) -> tuple[dict[str, Any], Any]:
    choice: dict[str, Any] = {"name": None, "uri": None, "error": None, "applied": {},
                              "explicit": False, "numerics": []}
    loaded = None
    if info.is_main:
        try:
            try:
                store.probe_writable()
            except StorageAccessError:
                raise
            except StorageError as e:
                # Transient trouble is the saves' business (retried, counted, exit 140); only
                # a folder we may never write to is bad input.
                log.warning("--checkpoint-dir %s: write probe failed (%s); continuing",
                            cfg.checkpoint_dir, e)
            loaded = choose_checkpoint(cfg, store, options, skip)
            if loaded is not None:
                verdict = rules.check(loaded, facts, cfg)
                rules.refuse_or_log(loaded, verdict, cfg.batch_size)
                choice.update(name=loaded.name, uri=loaded.uri, applied=verdict.applied,
                              numerics=verdict.numerics,
                              explicit=loaded.uri.rstrip("/") == cfg.resume.rstrip("/"))
        except InputError as e:
            choice["error"] = str(e)
        except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            choice["error"] = (f"--checkpoint-dir {cfg.checkpoint_dir}: cannot write there "
                               f"({type(e).__name__}: {redact(str(e))[:200]}); fix the "
                               "permissions or pick another folder")
        except StorageAccessError as e:  # no such bucket, access denied: bad input
            where = (f"--checkpoint-dir {cfg.checkpoint_dir}" if e.root == store.uri
                     else f"--resume {cfg.resume}")
            choice["error"] = f"{where}: {e}"
        except StorageError as e:  # unreachable is not invalid: retryable, not exit 2
            choice["error"], choice["storage"] = f"checkpoint storage failed: {e}", True
    choice = coll.broadcast_object(choice)
    if choice["error"]:
        raise (StorageError if choice.get("storage") else InputError)(choice["error"])
    if choice["uri"] and not info.is_main:
        try:
            loaded = open_uri(choice["uri"], options)[0].load(choice["name"], shards="size")
        except CorruptCheckpoint as e:
            raise InputError(f"rank {info.rank} cannot load {choice['uri']}: {e}") from None
        except StorageAccessError as e:
            raise InputError(f"rank {info.rank} cannot read {choice['uri']}: {e}") from None
        except StorageError as e:  # unreachable is not invalid: retryable
            raise StorageError(f"rank {info.rank} cannot read {choice['uri']}: {e}") from None
    return choice, loaded


# ---------------------------------------------------------------------------- which checkpoint
def choose_checkpoint(cfg: Config, store: CheckpointStore, options: dict[str, Any],
                      skip: frozenset[str] | set[str] = frozenset()) -> Loaded | None:
    """Rank 0: the checkpoint to resume from, None to start fresh; InputError to refuse.

    ``skip``: URIs of checkpoints found invalid since (a sharded checkpoint's shard checksums
    are verified by all ranks together, after this choice: ``CheckpointStore.verify_files``)."""
    if cfg.resume == "never":
        if store.step_dirs():
            raise InputError(f"--resume never, but --checkpoint-dir {cfg.checkpoint_dir} already "
                             "holds checkpoints; its steps would collide. Use an empty "
                             "--checkpoint-dir, or --resume auto to continue")
        return None
    if cfg.resume == "auto":
        if not store.committed_names():
            return None  # nothing committed; a save killed half-way is invisible by design
        loaded = store.latest(skip, shards="size")
        if loaded is None:
            raise InputError(f"--checkpoint-dir {cfg.checkpoint_dir} holds checkpoints but none "
                             "is valid (see the warnings above). Inspect them with "
                             f"`python -m ftrain.ckpt ls {cfg.checkpoint_dir}`; to start over, "
                             "use --resume never with an empty --checkpoint-dir")
        return loaded
    if store.committed_names():
        # A restart of the same command must continue this run's own newer checkpoints, not
        # go back to the URI it started from.
        log.info("--resume %s: --checkpoint-dir %s already holds this run's checkpoints; "
                 "resuming from the newest of them instead", cfg.resume, cfg.checkpoint_dir)
        loaded = store.latest(skip, shards="size")
        if loaded is not None:
            return loaded
    other, name = open_uri(cfg.resume, options)
    try:
        loaded = other.load(name, shards="size") if name else other.latest(skip, shards="size")
    except CorruptCheckpoint as e:
        raise InputError(f"--resume {cfg.resume}: invalid checkpoint: {e}") from None
    if loaded is None:
        raise InputError(f"--resume {cfg.resume}: no valid checkpoint there")
    return loaded


# ---------------------------------------------------------------------------- applying it
# State keys that depend on the run's length; on resume with other --epochs they come from
# the current run so the schedule stretches to the new end instead of running past it.
_HORIZON_KEYS = {"cosine": ("T_max",), "onecycle": ("total_steps", "_schedule_phases")}
_SCALED_KEYS = {"lr": ("lr", "initial_lr", "max_lr", "min_lr"),
                "momentum": ("momentum", "base_momentum", "max_momentum"),
                "weight_decay": ("weight_decay",)}


def load_scheduler_state(cfg: Config, sched, saved: dict[str, Any], custom: bool) -> None:
    """Load the schedule's state; for the built-in schedules take the horizon from this run."""
    if custom:
        sched.load_state_dict(saved)
        return
    fresh = sched.state_dict()
    saved = dict(saved)
    for key in _HORIZON_KEYS.get(cfg.scheduler, ()):
        if key in fresh and saved.get(key) != fresh[key]:
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


def apply_hyperparameters(optimizer: torch.optim.Optimizer, sched, applied: dict[str, tuple]
                          ) -> None:
    """Write changed --lr / --momentum / --weight-decay into the loaded optimizer and schedule:
    ``Optimizer.load_state_dict`` restored the checkpoint's values. Each param group's value is
    scaled by new/old (a task's own per-group ratios are kept); from 0 it is set."""
    for fact, keys in _SCALED_KEYS.items():
        if fact not in applied:
            continue
        before, after = (float(v) for v in applied[fact])
        for group in optimizer.param_groups:
            for key in keys:
                if key in group:
                    group[key] = _scaled(group[key], before, after)
            if fact == "momentum" and "betas" in group:
                beta1, beta2 = group["betas"]
                group["betas"] = (_scaled(beta1, before, after), beta2)
        if fact == "lr":
            sched.base_lrs = [_scaled(v, before, after) for v in sched.base_lrs]
            sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def _scaled(value: Any, before: float, after: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * (after / before) if before else torch.full_like(value, after)
    return value * (after / before) if before else after


def load_state(cfg: Config, loaded: Loaded, model: torch.nn.Module, optimizer, sched, task: Task,
               applied: dict[str, tuple], custom_scheduler: bool,
               scaler: torch.amp.GradScaler | None = None) -> None:
    """Load model, optimizer, schedule, gradient scaler and task state; InputError when they
    do not fit. (A scaler without saved state, after a precision change, starts afresh.)"""
    st = loaded.state
    try:
        if loaded.sharded:  # every rank reads its chunks (collective), sharded model or not
            from ..runtime.fsdp import load_sharded

            load_sharded(loaded, model, optimizer)
        elif cfg.parallel == "fsdp":  # a ddp checkpoint: each rank keeps its slices
            from ..runtime.fsdp import load_whole

            load_whole(loaded, model, optimizer)
        else:
            model.load_state_dict(st["model"])
            optimizer.load_state_dict(st["optimizer"])
            _own_memory(optimizer)
        load_scheduler_state(cfg, sched, st["scheduler"], custom_scheduler)
        if st.get("task"):
            task.load_state_dict(st["task"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"checkpoint {loaded.uri} does not fit this model/optimizer: "
                         f"{str(e)[:600]}\nResume with the --task, its arguments and the task "
                         "code this checkpoint was written with, or start afresh with "
                         "--resume never and a new --checkpoint-dir") from None
    apply_hyperparameters(optimizer, sched, applied)


def _own_memory(optimizer: torch.optim.Optimizer) -> None:
    """A local checkpoint is loaded memory-mapped; the model copies its weights, but the
    optimizer keeps the loaded CPU tensors as its state. Give it memory of its own, so that
    the run never depends on the checkpoint's file (retention deletes it, a user may move it)."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                state[key] = value.clone()


def start_from_plain(cfg: Config, plain: Plain, model: torch.nn.Module, optimizer, sched,
                     steps_per_epoch: int, is_main: bool) -> TrainState:
    """A fresh run from a plain checkpoint (--init-from): the model's weights (each rank its
    slices under fsdp); from a script's dict also the optimizer and the schedule, and the
    train state at the next epoch start, the file's records in the history. InputError when
    they do not fit."""
    sharded = cfg.parallel == "fsdp"
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(model, plain.model,
                                 options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(plain.model)
        if plain.full and plain.optimizer is not None:
            if sharded:
                from ..runtime.fsdp import load_optimizer_whole

                load_optimizer_whole(plain.optimizer, optimizer, model)
            else:
                optimizer.load_state_dict(plain.optimizer)
                _own_memory(optimizer)
        if plain.full and plain.scheduler is not None:
            sched.load_state_dict(plain.scheduler)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"--init-from {plain.uri} does not fit this model/optimizer: "
                         f"{str(e)[:600]}") from None
    state = TrainState()
    if not plain.full:
        if is_main:
            log.info("starting from the weights of --init-from %s", plain.uri)
        return state
    why = (f"imported from the plain checkpoint {plain.uri}: it kept no RNG states or data "
           "position, so this continuation is not bitwise that of its script")
    state.epoch = plain.epochs_done
    state.step = plain.epochs_done * steps_per_epoch
    if plain.epochs_done:
        state.history.append({"epoch": plain.epochs_done, "step": state.step,
                              "imported": plain.records, "not_bitwise": [why]})
    else:
        state.not_bitwise.append(why)
    if is_main:
        log.warning("--init-from %s: a script's checkpoint (epoch %d read as the epochs done; "
                    "optimizer %s, schedule %s); training continues at epoch %d. %s",
                    plain.uri, plain.epochs_done, "loaded" if plain.optimizer else "fresh",
                    "loaded" if plain.scheduler else "fresh", plain.epochs_done + 1, why)
    return state
