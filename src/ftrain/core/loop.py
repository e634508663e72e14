"""The training loop. Owns epoch, step, position in the epoch, the running metric sums and the
metric history; reseeds. When to save is the SavePolicy's business, when to stop the
StopControl's; the loop asks them at every step boundary."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from ..checkpoint.policy import SavePolicy
from ..config import Config
from ..data.items import (
    EpochTagged,
    EvalShardSampler,
    ResumableDistributedSampler,
    SeededItems,
    TensorItems,
    mix_seed,
)
from ..runtime import exitcodes
from ..runtime.distributed import Collectives, DistInfo
from ..runtime.monitor import Monitor
from ..tasks import Task
from .control import StopControl, hard_exit, ignore_stop_signals

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- seeding
def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_seed(seed: int) -> int:
    """Seed used to build the model: the same on every rank, before the model exists."""
    return mix_seed(seed, 0x1417)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return mix_seed(seed, epoch, rank)


def resume_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of a mid-epoch resume that has no saved RNG states for this rank (another world
    size, or a checkpoint without them)."""
    return mix_seed(seed, epoch, batch, rank, 0x57E9)


SEEDS_DOC = {"epoch": "mix_seed(seed, epoch, rank), once per epoch; a mid-epoch resume "
                      "restores each rank's saved RNG states",
             "resume_other_world": "mix_seed(seed, epoch, batch, rank, 0x57E9)",
             "data_order": "mix_seed(seed, epoch)",
             "item": "mix_seed(seed, epoch, sample_index)"}


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's python, numpy, torch (and this GPU's) RNG states, as checkpointable
    values (tensors, ints, lists)."""
    version, internal, gauss = random.getstate()
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # global optimizer steps completed
    batch_in_epoch: int = 0  # global batches of epoch ``epoch`` already trained
    history: list[dict[str, Any]] = field(default_factory=list)
    # Metric sums of the unfinished epoch (each global batch's sum over ranks, added in batch
    # order), carried across a restart so that the epoch's metrics come out exactly as in an
    # uninterrupted run.
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    elapsed: float = 0.0
    resumes: int = 0  # times the run was resumed from a checkpoint (a fact, not progress)
    # Why this epoch is no longer bitwise equal to an uninterrupted run (a resume on another
    # numeric environment); recorded in its history entry as "not_bitwise".
    not_bitwise: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "history": self.history, "resumes": self.resumes,
                "epoch_progress": {"sums": self.sums, "seen": self.seen,
                                   "elapsed": self.elapsed, "not_bitwise": self.not_bitwise}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        p = d.get("epoch_progress", {})
        if "sums" in p:
            sums = {str(k): float(v) for k, v in p["sums"].items()}
        else:  # written before tasks: the built-in task's per-batch loss sums and correct count
            sums = {"loss": sum(float(x) for x in p.get("loss_steps", [])),
                    "acc": float(p.get("correct", 0))} if p.get("seen") else {}
        return cls(int(d["epoch"]), int(d["step"]), int(d.get("batch_in_epoch", 0)),
                   list(d.get("history", [])), sums, int(p.get("seen", 0)),
                   float(p.get("elapsed", 0.0)), int(d.get("resumes", 0)),
                   [str(x) for x in p.get("not_bitwise", [])])


@dataclass
class Parts:
    model: nn.Module  # unwrapped, on its device
    ddp: nn.Module  # what forward/backward go through (DDP or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: Dataset  # the task's datasets
    test_set: Dataset
    scaler: torch.amp.GradScaler | None = None  # --precision fp16 only


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> Any:
    """The autocast context of ``--precision`` (a no-op for fp32)."""
    dtype = AUTOCAST[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(obj: Any, device: torch.device) -> Any:
    """A batch's inputs or targets (tensor, or dict/tuple/list of them) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def split_batch(obj: Any, n: int) -> list[Any]:
    """``obj`` cut into ``n`` micro-batches along the first dimension."""
    if n == 1:
        return [obj]
    if isinstance(obj, torch.Tensor):
        return list(obj.tensor_split(n))
    if isinstance(obj, dict):
        parts = {k: split_batch(v, n) for k, v in obj.items()}
        return [{k: parts[k][i] for k in obj} for i in range(n)]
    if isinstance(obj, (list, tuple)):
        parts = [split_batch(v, n) for v in obj]
        return [type(obj)(p[i] for p in parts) for i in range(n)]
    return [obj] * n


def device_tensors(data: Dataset, device: torch.device, mode: str
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(inputs, targets) of an in-memory tensor dataset whose items are plain rows of them
    (TensorItems, or a TensorDataset of two tensors), moved to ``device`` when they fit (on a
    GPU: within a quarter of its free memory); None otherwise, or with --data-on-device off."""
    if mode == "off":
        return None
    if isinstance(data, TensorItems):
        x, y = data.x, data.y
    elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    else:
        return None
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if (x.nbytes + y.nbytes) > free // 4:
            log.info("the training set (%.0f MiB) does not fit on %s: using a DataLoader",
                     (x.nbytes + y.nbytes) / 2**20, device)
            return None
    return x.to(device), y.to(device)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, coll: Collectives, task: Task, parts: Parts,
                 state: TrainState, saver: SavePolicy, control: StopControl,
                 monitor: Monitor, resume_rng: dict[str, Any] | None = None) -> None:
        self.cfg, self.info, self.coll, self.task, self.p = cfg, info, coll, task, parts
        self.monitor = monitor
        self.state = state
        self.resume_rng = resume_rng  # this rank's RNG states at the resumed step, if saved
        self.saver = saver
        self.control = control
        self.train_items = SeededItems(parts.train_set, cfg.seed)
        self.sampler = ResumableDistributedSampler(self.train_items, info.world_size, info.rank,
                                                   cfg.batch_size, cfg.seed)
        self.eval_items = SeededItems(parts.test_set, cfg.seed)
        self.eval_sampler = EvalShardSampler(len(self.eval_items), info.world_size, info.rank)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.per_rank_batch = cfg.batch_size // info.world_size
        self.metric_names: list[str] = list(state.sums)
        self.on_device = device_tensors(parts.train_set, info.device, cfg.data_on_device)
        # Built by fit(); with --num-workers their workers live as long as the run.
        self._train_loader: DataLoader | None = None
        self._eval_loader: DataLoader | None = None
        # This run's per-step metric sums on this rank, not yet folded into the state.
        self._local: list[torch.Tensor] = []
        self._trace = None
        if cfg.trace_samples:
            os.makedirs(cfg.trace_samples, exist_ok=True)
            path = os.path.join(cfg.trace_samples, f"rank{info.rank}-pid{os.getpid()}.jsonl")
            self._trace = open(path, "a", buffering=1)  # noqa: SIM115 - closed in fit()

    # ------------------------------------------------------------------ public
    def fit(self) -> int:
        """Train to ``--epochs`` (or ``--max-steps``); returns the process exit code."""
        try:
            self._start_loaders()
            return self._fit()
        finally:
            self.monitor.end_epoch()
            # The last reference to each loader: its iterator stops the workers.
            self._train_loader = self._eval_loader = None
            if self._trace:
                self._trace.close()

    def _fit(self) -> int:
        cfg, st = self.cfg, self.state
        while st.epoch < cfg.epochs:
            outcome = self._run_epoch()
            if isinstance(outcome, int):
                return outcome
            self._end_epoch()
            code = self._after_epoch(outcome)
            if code is not None:
                return code
        if self.info.is_main:
            log.info("training complete: %d epochs, %d steps", st.epoch, st.step)
        return exitcodes.OK

    # ------------------------------------------------------------------ loaders
    def _start_loaders(self) -> None:
        """Build the train and eval loaders and, with --num-workers, fork their workers now,
        once for the run, while no other thread of this process does anything: no save is
        being persisted and no background collective is in flight yet.

        A fork copies every lock as it is at that instant, and the child has only the forking
        thread: a lock another thread held then stays held in the child. Loaders built per
        epoch forked while the checkpoint persister wrote the epoch-end save and the stop
        agreement's all-reduce ran on a gloo thread; persistent workers fork once, at the
        quiet start. (Their copy of the dataset never sees a later ``set_epoch``, so each
        index carries its epoch: ``EpochTagged``.)

        The eval loader goes first and does not pin memory: a loader that pins starts a
        thread right after forking its workers (torch.set_num_threads and CUDA set-up in it:
        pytorch/pytorch#130610 is a worker forked during that), so the only one that does,
        the train loader's, starts after the last fork.
        """
        cuda = self.info.device.type == "cuda"
        self._eval_loader = self._new_loader(self.eval_items, self.eval_sampler,
                                             max(self.per_rank_batch, 256), False, 0xE7A1,
                                             pin_memory=False)
        if self.on_device is None:
            self._train_loader = self._new_loader(self.train_items, self.sampler,
                                                  self.per_rank_batch, True, 0x10AD,
                                                  pin_memory=cuda)
        if not self.cfg.num_workers:
            return
        for loader in (self._eval_loader, self._train_loader):
            if loader is None:
                continue
            tagged = loader.sampler
            assert isinstance(tagged, EpochTagged)
            tagged.idle = True
            try:
                iter(loader)  # forks the workers, gives them nothing to do yet
            finally:
                tagged.idle = False

    def _new_loader(self, items: SeededItems, sampler: Sampler, batch_size: int,
                    drop_last: bool, salt: int, pin_memory: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(items, batch_size=batch_size, sampler=EpochTagged(sampler, items),
                          num_workers=workers, drop_last=drop_last,
                          worker_init_fn=ignore_stop_signals, pin_memory=pin_memory,
                          persistent_workers=workers > 0,
                          # The loader's base seed (for its workers, whose items SeededItems
                          # seeds anyway) comes from here, not from the global torch RNG.
                          generator=torch.Generator().manual_seed(
                              mix_seed(self.cfg.seed, self.info.rank, salt)))

    # ------------------------------------------------------------------ epoch
    def _batches(self):
        """This rank's batches of the rest of the epoch: ``((inputs, targets), indices)``.
        Neither way draws from the global RNGs: a model's randomness does not depend on
        --data-on-device or --num-workers."""
        if self.on_device is None:
            return iter(self._loader())
        return self._gathered()

    def _gathered(self):
        """Batches gathered from tensors already on the device, by the sampler's indices: no
        DataLoader, no per-item Python, no host-to-device copy per step."""
        st = self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        x, y = self.on_device
        on_dev = order.to(self.info.device)
        for b in range(len(order) // self.per_rank_batch):
            cut = slice(b * self.per_rank_batch, (b + 1) * self.per_rank_batch)
            yield (x[on_dev[cut]], y[on_dev[cut]]), order[cut]

    def _loader(self) -> DataLoader:
        """The train loader, set to the rest of the current epoch."""
        st = self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch)
        self.train_items.set_epoch(st.epoch)
        assert self._train_loader is not None, "fit() builds the loaders"
        return self._train_loader

    def _run_epoch(self) -> int | str | None:
        """Train the rest of the current epoch. Returns an exit code to stop mid-epoch, or, at
        the epoch's end, the stop agreed during it ("preempt", "max" or None)."""
        cfg, st, info = self.cfg, self.state, self.info
        # Seeded once per epoch: a reseed per step touches every CUDA device (30% of a small
        # model's step on an H100). A mid-epoch resume restores the RNG states this rank had
        # at that step instead.
        if st.batch_in_epoch == 0:
            seed_all(epoch_seed(cfg.seed, st.epoch, info.rank))
            st.sums, st.seen, st.elapsed = {}, 0, 0.0
        elif self.resume_rng is None:
            seed_all(resume_seed(cfg.seed, st.epoch, st.batch_in_epoch, info.rank))
        self.p.model.train()
        t_start = time.perf_counter()
        t_log, n_log = t_start, 0
        self._local = []
        self.control.start_epoch()
        self.monitor.start_epoch(st.epoch, cfg.epochs, st.batch_in_epoch, self.steps_per_epoch)
        batches = self._batches()
        if self.resume_rng is not None:
            if st.batch_in_epoch:
                restore_rng(self.resume_rng, info.device)
            self.resume_rng = None
        for (inputs, targets), idx in batches:
            self._step(inputs, targets)
            if self._trace:
                self._trace.write(json.dumps({"epoch": st.epoch, "step": st.step + 1,
                                              "batch": st.batch_in_epoch, "rank": info.rank,
                                              "world": info.world_size, "idx": idx.tolist()}) + "\n")
            st.step += 1
            st.batch_in_epoch += 1
            n_log += 1
            self.monitor.step(st.step)
            if info.is_main and cfg.log_every_steps and st.step % cfg.log_every_steps == 0:
                self._log_step(n_log * cfg.batch_size / max(time.perf_counter() - t_log, 1e-9))
                t_log, n_log = time.perf_counter(), 0

            last_batch = st.batch_in_epoch == self.steps_per_epoch
            decision = self.control.after_step()
            if decision.storage_failed:
                self.control.drain()
                return self._storage_failed_exit()
            hit_max = bool(cfg.max_steps) and st.step >= cfg.max_steps
            if last_batch:
                # The epoch end saves after evaluation; a stop request is honoured there.
                self.control.drain()
                st.elapsed += time.perf_counter() - t_start
                self._fold_sums()
                return "preempt" if decision.preempt else ("max" if hit_max else None)
            if decision.preempt or hit_max:
                self.control.drain()
                st.elapsed += time.perf_counter() - t_start
                return self._stop_mid_epoch("preempt" if decision.preempt else "max")
            if decision.timed_save or self.saver.step_due(st.step):
                self.saver.due()
                if decision.storage_busy:
                    self.saver.skip(st.step)
                    continue
                elapsed = st.elapsed
                st.elapsed += time.perf_counter() - t_start
                self.saver.save(*self._progress(), st.step, blocking=False,
                                reason="timed" if decision.timed_save else "step")
                st.elapsed = elapsed
        # Only reached when the loader had nothing left (a resume at the epoch's last batch).
        self.control.drain()
        self._fold_sums()
        st.elapsed += time.perf_counter() - t_start
        return None

    def _log_step(self, samples_per_s: float) -> None:
        """Rank 0's periodic figures: this rank's share of the newest step, through the task's
        metrics (a host sync, only on logging steps), to the log (or the progress bar) and
        the monitor's outlets."""
        st, cfg = self.state, self.cfg
        sums = dict(zip(self.metric_names, self._local[-1].tolist(), strict=True))
        metrics = self.task.metrics(sums, self.per_rank_batch)
        lr = self.p.scheduler.get_last_lr()[0]
        self.monitor.logged(st.step, metrics, lr, samples_per_s)
        if not self.monitor.bar_active:
            log.info("epoch %d/%d  batch %d/%d  step %d  %s  lr %.4g  %.0f samples/s",
                     st.epoch + 1, cfg.epochs, st.batch_in_epoch, self.steps_per_epoch, st.step,
                     _fmt(metrics), lr, samples_per_s,
                     extra={"fields": {"event": "step", "epoch": st.epoch + 1,
                                       "batch": st.batch_in_epoch, "step": st.step,
                                       "metrics": metrics, "lr": lr,
                                       "samples_per_s": samples_per_s}})

    def _step(self, inputs: Any, targets: Any) -> None:
        """One optimizer step over this rank's share of a global batch, in --grad-accum
        micro-batches; its metric sums join this run's running sums (no host sync)."""
        cfg, dev, p, task = self.cfg, self.info.device, self.p, self.task
        inputs, targets = to_device(inputs, dev), to_device(targets, dev)
        accum = cfg.grad_accum
        step_sums: torch.Tensor | None = None
        for k, (x, y) in enumerate(zip(split_batch(inputs, accum), split_batch(targets, accum),
                                       strict=True)):
            # Gradients are all-reduced once per step, with the last micro-batch.
            sync = k == accum - 1 or not hasattr(p.ddp, "no_sync")
            with contextlib.nullcontext() if sync else p.ddp.no_sync():
                with autocast(cfg.precision, dev):
                    out = task.forward(p.ddp, x)
                    loss_sum, sums = task.loss(out, y)
                loss = loss_sum / self.per_rank_batch
                (p.scaler.scale(loss) if p.scaler is not None else loss).backward()
            row = self._sum_row(sums)
            step_sums = row if step_sums is None else step_sums + row
        if p.scaler is not None:
            p.scaler.unscale_(p.optimizer)  # clip the true gradients
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.clip_grad_norm)
        if p.scaler is not None:
            p.scaler.step(p.optimizer)  # skipped when the gradients overflowed
            p.scaler.update()
        else:
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        p.scheduler.step()
        task.after_step(p.model)
        self._local.append(step_sums)

    def _sum_row(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """The metric sums of one batch as a float64 vector, in a fixed order of names."""
        if not self.metric_names:
            self.metric_names = list(sums)
        if set(sums) != set(self.metric_names):
            raise ValueError(f"{type(self.task).__name__}.loss returned the metric sums "
                             f"{sorted(sums)}; earlier batches returned {sorted(self.metric_names)}"
                             ": return the same names every time")
        return torch.stack([torch.as_tensor(sums[k]).detach().to(self.info.device,
                                                                  torch.float64).reshape(())
                            for k in self.metric_names])

    # ------------------------------------------------------------------ running sums
    def _global_sums(self) -> tuple[dict[str, float], int]:
        """This run's part of the epoch: the metric sums over ranks, each batch's sum taken in
        rank order and the batches added in order, and the number of batches; collective."""
        k = len(self.metric_names)
        local = torch.stack(self._local) if self._local else torch.zeros(
            (0, k), dtype=torch.float64, device=self.info.device)
        rows = self.coll.gather_rows(local)  # (world, batches, metrics)
        per_batch = rows.sum(dim=0).cpu().tolist()
        totals = dict(self.state.sums)
        for row in per_batch:
            for name, value in zip(self.metric_names, row, strict=True):
                totals[name] = totals.get(name, 0.0) + value
        return totals, len(per_batch)

    def _fold_sums(self) -> None:
        """Move this run's running sums into the state (collective)."""
        st = self.state
        st.sums, batches = self._global_sums()
        st.seen += batches * self.cfg.batch_size
        self._local = []

    def _progress(self) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """The state with the unfinished epoch's sums folded in, without consuming them, and
        mid-epoch every rank's RNG states in rank order (collective)."""
        st = self.state
        if not st.batch_in_epoch:
            return st.to_dict(), None
        sums, batches = self._global_sums()
        rng = self.coll.gather_objects(rng_state(self.info.device))
        return TrainState(st.epoch, st.step, st.batch_in_epoch, st.history, sums,
                          st.seen + batches * self.cfg.batch_size, st.elapsed, st.resumes,
                          st.not_bitwise).to_dict(), rng

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        self.monitor.end_epoch()
        train = self.task.metrics(st.sums, st.seen)
        evaluated = self.evaluate()
        entry: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step}
        entry.update({f"train_{k}": v for k, v in train.items()})
        entry.update({f"eval_{k}": v for k, v in evaluated.items()})
        entry.update(lr=self.p.scheduler.get_last_lr()[0],
                     samples_per_s=st.seen / max(st.elapsed, 1e-9), seconds=st.elapsed,
                     saves_dropped=self.saver.dropped)  # timing-dependent, like the two above
        if st.not_bitwise:
            entry["not_bitwise"] = list(st.not_bitwise)
            st.not_bitwise = []
        st.history.append(entry)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.sums, st.seen, st.elapsed = {}, 0, 0.0
        if self.info.is_main:
            log.info("epoch %d/%d done: train %s | eval %s | lr %.4g | %.0f samples/s | %.1fs",
                     entry["epoch"], cfg.epochs, _fmt(train), _fmt(evaluated), entry["lr"],
                     entry["samples_per_s"], entry["seconds"],
                     extra={"fields": {"event": "epoch", **entry}})
            self.monitor.epoch_done(entry)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the whole eval set, each item once, sharded over ranks."""
        info, model = self.info, self.p.model
        if info.is_distributed:
            # BatchNorm running stats drift apart per rank after the last forward; rank 0's
            # are the model's (they are what is checkpointed).
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)
        model.eval()
        items = self.eval_items
        items.set_epoch(self.state.epoch)
        loader = self._eval_loader
        assert loader is not None, "fit() builds the loaders"
        names: list[str] = []
        totals: torch.Tensor | None = None
        # Under fsdp every forward is collective (each unit gathers its parameters): a rank
        # with fewer eval batches than rank 0 runs its last batch again, discarded.
        batch = loader.batch_size or 1
        padding = -(-len(range(0, len(items), info.world_size)) // batch) - len(loader) \
            if self.cfg.parallel == "fsdp" and info.world_size > 1 else 0
        inputs = None
        for (inputs, targets), idx in loader:
            self.monitor.beat()  # an evaluation may take longer than a liveness probe waits
            with autocast(self.cfg.precision, info.device):
                out = self.task.forward(model, to_device(inputs, info.device))
                _, sums = self.task.loss(out, to_device(targets, info.device))
            if totals is None:
                names = list(sums)
                totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=info.device)
            for i, name in enumerate(names):
                totals[i] += torch.as_tensor(sums[name]).to(torch.float64)
            totals[-1] += len(idx)
        if padding and inputs is None:  # no eval item of its own: rank 0's first one
            (inputs, _targets), _ = default_collate([items[0]])
        for _ in range(padding):
            with autocast(self.cfg.precision, info.device):
                self.task.forward(model, to_device(inputs, info.device))
        # Every rank takes part in the reduction, even one with no eval item (names from the
        # training sums then, which are the same names).
        if totals is None:
            names = list(self.metric_names)
            totals = torch.zeros(len(names) + 1, dtype=torch.float64, device=info.device)
        self.coll.sum_(totals)
        model.train()
        values = totals.cpu().tolist()
        return self.task.metrics(dict(zip(names, values[:-1], strict=True)), int(values[-1]))

    def _after_epoch(self, stop: str | None) -> int | None:
        cfg, st = self.cfg, self.state
        # A signal may have reached any rank during evaluation: agree before deciding.
        decision = self.control.agree_now()
        if decision.storage_failed:
            return self._storage_failed_exit()
        if decision.preempt:
            stop = "preempt"
        final = st.epoch >= cfg.epochs
        hit_max = bool(cfg.max_steps) and st.step >= cfg.max_steps
        if stop == "preempt":
            return self._preempt_exit(self._emergency_save("epoch"))
        if final or stop is not None or hit_max:
            if not self.saver.save_blocking(*self._progress(), st.step, reason="epoch"):
                return self._storage_failed_exit()
        else:
            self.saver.save(*self._progress(), st.step, blocking=False, reason="epoch")
        if hit_max and not final:
            if self.info.is_main:
                log.info("reached --max-steps %d at step %d; stopping", cfg.max_steps, st.step)
            return exitcodes.OK
        return None

    # ------------------------------------------------------------------ stopping
    def _emergency_save(self, reason: str) -> bool:
        """No retries when preempted: the grace period is short, and a failed emergency
        checkpoint costs only the steps since the last committed one."""
        timeout = self.control.emergency_timeout(self.cfg.preemption_deadline)
        return self.saver.save(*self._progress(), self.state.step, blocking=True, reason=reason,
                               timeout=timeout)

    def _stop_mid_epoch(self, why: str) -> int:
        st = self.state
        if why == "preempt":
            return self._preempt_exit(self._emergency_save("preempt"))
        if not self.saver.save_blocking(*self._progress(), st.step, reason="max_steps"):
            return self._storage_failed_exit()
        if self.info.is_main:
            log.info("reached --max-steps %d at step %d; stopping", self.cfg.max_steps, st.step)
        return exitcodes.OK

    def _preempt_exit(self, saved: bool) -> int:
        code = self.control.exit_code()
        if saved:
            if self.info.is_main:
                log.warning("stopped at step %d after an emergency checkpoint; exit %d "
                            "(retryable): rerun the same command to resume", self.state.step,
                            code)
            return code
        abandoned = self.saver.abandoned
        if self.info.is_main:
            last = self.saver.last_committed_step
            log.error("EMERGENCY CHECKPOINT AT STEP %d %s; exiting %d (retryable) without it: "
                      "the rerun resumes from the newest committed checkpoint (%s)",
                      self.state.step, f"MISSED --preemption-deadline "
                      f"{self.cfg.preemption_deadline:g}s" if abandoned else "FAILED", code,
                      f"step {last}" if last is not None else "from an earlier run, if any")
        if abandoned:
            # The write goes on in a thread that interpreter shutdown would wait for; a partial
            # checkpoint is invisible (no manifest), so leave now.
            hard_exit(code)
        return code

    def _storage_failed_exit(self) -> int:
        if self.info.is_main:
            ckpt = self.saver.ckpt
            failed = ckpt.consecutive_failures if ckpt is not None else self.cfg.max_failed_saves
            log.error("checkpoints failed %d times in a row (--max-failed-saves %d); exiting "
                      "with %d (retryable) so the job restarts once storage is back", failed,
                      self.cfg.max_failed_saves, exitcodes.STORAGE_FAILED)
        return exitcodes.STORAGE_FAILED


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())

