"""The training loop. Owns epoch, step, position in the epoch, running metric sums and the
metric history; reseeds; decides with the other ranks when to save or stop."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import exitcodes
from .checkpoint import Checkpointer, SaveTimeout
from .config import Config
from .data import EvalShardSampler, ResumableDistributedSampler, mix_seed
from .distributed import Collectives, DistInfo

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


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return mix_seed(seed, epoch, batch, rank, 0x57E9)


# ---------------------------------------------------------------------------- signals
class StopSignals:
    """SIGTERM/SIGINT set a flag; the loop agrees on it with the other ranks at the next step
    boundary and writes an emergency checkpoint. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.hard_deadline_s = 60.0

    def install(self, hard_deadline_s: float = 60.0) -> None:
        """``hard_deadline_s``: after a signal, exit no matter what once this much time has
        passed (a peer that died mid-collective must not keep us past the grace period)."""
        self.hard_deadline_s = hard_deadline_s
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            self.received_at = time.monotonic()
            log.warning("received %s: checkpointing at the next step boundary, then exiting",
                        signal.Signals(signum).name)
            watchdog = threading.Timer(self.hard_deadline_s, self._give_up)
            watchdog.daemon = True
            watchdog.start()

    def _give_up(self) -> None:
        code = self.exit_code()
        log.error("no clean stop within %.0fs of the signal; exiting %d without waiting further",
                  self.hard_deadline_s, code)
        exitcodes.record(code)
        logging.shutdown()
        os._exit(code)

    def exit_code(self, signum: int | None = None) -> int:
        signum = signum or self.received
        return exitcodes.INTERRUPTED if signum == signal.SIGINT else exitcodes.PREEMPTED


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT to the training process. torchrun
    signals a worker's whole process group; a loader worker killed by it would crash the
    training process before its emergency checkpoint. (Loader workers still exit when the
    training process does.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StorageFailed(Exception):
    pass


# ---------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry besides the tensors."""

    epoch: int = 0  # epochs completed
    step: int = 0  # global optimizer steps completed
    batch_in_epoch: int = 0  # global batches of epoch ``epoch`` already trained
    history: list[dict[str, Any]] = field(default_factory=list)
    # Running sums of the unfinished epoch, carried across a restart so that the epoch's
    # train loss/accuracy come out exactly as in an uninterrupted run.
    loss_steps: list[float] = field(default_factory=list)  # per global batch, summed over ranks
    correct: int = 0
    seen: int = 0
    elapsed: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "history": self.history,
                "epoch_progress": {"loss_steps": self.loss_steps, "correct": self.correct,
                                   "seen": self.seen, "elapsed": self.elapsed}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        p = d.get("epoch_progress", {})
        return cls(int(d["epoch"]), int(d["step"]), int(d.get("batch_in_epoch", 0)),
                   list(d.get("history", [])), [float(x) for x in p.get("loss_steps", [])],
                   int(p.get("correct", 0)), int(p.get("seen", 0)), float(p.get("elapsed", 0.0)))


@dataclass
class Parts:
    model: nn.Module  # unwrapped, on its device
    ddp: nn.Module  # what forward/backward go through (DDP or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: Dataset
    test_set: Dataset
    model_args: dict[str, Any]


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, coll: Collectives, parts: Parts,
                 state: TrainState, checkpointer: Checkpointer | None, signals: StopSignals) -> None:
        self.cfg, self.info, self.coll, self.p = cfg, info, coll, parts
        self.state = state
        self.ckpt = checkpointer  # rank 0 only
        self.signals = signals
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")
        self.sampler = ResumableDistributedSampler(parts.train_set, info.world_size, info.rank,
                                                   cfg.batch_size, cfg.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.per_rank_batch = cfg.batch_size // info.world_size
        self._last_save_time = time.monotonic()
        self._trace = None
        if cfg.trace_samples:
            os.makedirs(cfg.trace_samples, exist_ok=True)
            path = os.path.join(cfg.trace_samples, f"rank{info.rank}-pid{os.getpid()}.jsonl")
            self._trace = open(path, "a", buffering=1)  # noqa: SIM115 - closed in fit()

    # ------------------------------------------------------------------ public
    def fit(self) -> int:
        """Train to ``--epochs`` (or ``--max-steps``); returns the process exit code."""
        try:
            return self._fit()
        finally:
            if self._trace:
                self._trace.close()

    def _fit(self) -> int:
        cfg, st = self.cfg, self.state
        while st.epoch < cfg.epochs:
            stop = self._run_epoch()
            if stop is not None:
                return stop
            if st.batch_in_epoch == self.steps_per_epoch:
                self._end_epoch()
                code = self._after_epoch_save()
                if code is not None:
                    return code
        if self.info.is_main:
            log.info("training complete: %d epochs, %d steps", st.epoch, st.step)
        return exitcodes.OK

    # ------------------------------------------------------------------ epoch
    def _loader(self) -> DataLoader:
        st = self.state
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start(st.batch_in_epoch)
        if hasattr(self.p.train_set, "set_epoch"):
            self.p.train_set.set_epoch(st.epoch)
        return DataLoader(self.p.train_set, batch_size=self.per_rank_batch, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, drop_last=True,
                          worker_init_fn=ignore_stop_signals,
                          pin_memory=self.info.device.type == "cuda",
                          persistent_workers=False)

    def _run_epoch(self) -> int | None:
        """Train the rest of the current epoch. Returns an exit code to stop, else None."""
        cfg, st, info = self.cfg, self.state, self.info
        # Reseed at every epoch start and on a mid-epoch resume alike.
        seed_all(epoch_seed(cfg.seed, st.epoch, info.rank))
        if st.batch_in_epoch == 0:
            st.loss_steps, st.correct, st.seen, st.elapsed = [], 0, 0, 0.0
        model, ddp, opt, sched = self.p.model, self.p.ddp, self.p.optimizer, self.p.scheduler
        model.train()
        dev = info.device
        local_losses: list[torch.Tensor] = []
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        t_start = time.perf_counter()
        t_log, n_log = t_start, 0
        self._local = (local_losses, correct)
        pending = self.coll.start_agree(self._flags()) if info.is_distributed else None
        for x, y, idx in self._loader():
            torch.manual_seed(step_seed(cfg.seed, st.epoch, st.batch_in_epoch, info.rank))
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            out = ddp(x)
            loss_sum = self.loss_fn(out, y)
            (loss_sum / self.per_rank_batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            local_losses.append(loss_sum.detach().to(torch.float64))
            correct += (out.argmax(1) == y).sum()
            if self._trace:
                self._trace.write(json.dumps({"epoch": st.epoch, "step": st.step + 1,
                                              "batch": st.batch_in_epoch, "rank": info.rank,
                                              "world": info.world_size, "idx": idx.tolist()}) + "\n")
            st.step += 1
            st.batch_in_epoch += 1
            n_log += 1
            if info.is_main and cfg.log_every_steps and st.step % cfg.log_every_steps == 0:
                now = time.perf_counter()
                log.info("epoch %d/%d  batch %d/%d  step %d  loss %.4f  lr %.4g  %.0f samples/s",
                         st.epoch + 1, cfg.epochs, st.batch_in_epoch, self.steps_per_epoch,
                         st.step, loss_sum.item() / self.per_rank_batch, sched.get_last_lr()[0],
                         n_log * cfg.batch_size / max(now - t_log, 1e-9))
                t_log, n_log = now, 0

            last_batch = st.batch_in_epoch == self.steps_per_epoch
            flags = self._flags()
            if pending is not None:
                agreed = pending.result()  # flags every rank raised one step ago
                pending = self.coll.start_agree(flags)
            else:
                agreed = flags
            preempt, timed, storage_failed = agreed
            if storage_failed:
                self._drain(pending)
                return self._storage_failed_exit()
            hit_max = bool(cfg.max_steps) and st.step >= cfg.max_steps
            if last_batch:
                # The epoch end saves after evaluation; a stop request is honoured there.
                self._drain(pending)
                st.elapsed += time.perf_counter() - t_start
                self._fold_epoch_sums()
                self._pending_stop = "preempt" if preempt else ("max" if hit_max else None)
                return None
            if preempt or hit_max:
                self._drain(pending)
                st.elapsed += time.perf_counter() - t_start
                return self._stop_mid_epoch("preempt" if preempt else "max")
            if timed or (cfg.save_every_steps and st.step % cfg.save_every_steps == 0):
                st_elapsed = st.elapsed
                st.elapsed += time.perf_counter() - t_start
                self._save(blocking=False, reason="timed" if timed else "step")
                st.elapsed = st_elapsed
        self._drain(pending)
        self._fold_epoch_sums()
        st.elapsed += time.perf_counter() - t_start
        return None

    def _flags(self) -> list[int]:
        cfg = self.cfg
        preempt = int(self.signals.received is not None)
        timed = int(self.info.is_main and cfg.save_every_seconds > 0
                    and time.monotonic() - self._last_save_time >= cfg.save_every_seconds)
        failed = int(self.ckpt is not None
                     and self.ckpt.consecutive_failures >= cfg.max_failed_saves)
        return [preempt, timed, failed]

    def _drain(self, pending) -> None:
        if pending is not None:
            pending.result()

    # ------------------------------------------------------------------ running sums
    def _global_progress(self) -> tuple[list[float], int]:
        """Per-batch loss sums of this run's part of the epoch, summed over ranks in rank
        order, and the number correct; collective."""
        local_losses, correct = self._local
        if local_losses:
            rows = self.coll.gather_rows(torch.stack(local_losses))  # (world, batches)
            per_batch = rows.sum(dim=0).cpu().tolist()
        else:
            self.coll.gather_rows(torch.zeros(0, dtype=torch.float64, device=self.info.device))
            per_batch = []
        total_correct = int(self.coll.sum_(correct.clone()).item())
        return per_batch, total_correct

    def _fold_epoch_sums(self) -> None:
        """Move this run's running sums into the state (collective)."""
        per_batch, total_correct = self._global_progress()
        st = self.state
        st.loss_steps = st.loss_steps + per_batch
        st.correct += total_correct
        st.seen += len(per_batch) * self.cfg.batch_size
        self._local = ([], torch.zeros((), dtype=torch.int64, device=self.info.device))

    def _state_for_save(self) -> TrainState:
        """The state with the unfinished epoch's sums folded in, without consuming them."""
        per_batch, total_correct = self._global_progress()
        st = self.state
        return TrainState(st.epoch, st.step, st.batch_in_epoch, st.history,
                          st.loss_steps + per_batch, st.correct + total_correct,
                          st.seen + len(per_batch) * self.cfg.batch_size, st.elapsed)

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        eval_loss, eval_acc = self.evaluate()
        train_loss = sum(st.loss_steps) / max(st.seen, 1)
        train_acc = st.correct / max(st.seen, 1)
        entry = {
            "epoch": st.epoch + 1, "step": st.step,
            "train_loss": train_loss, "train_acc": train_acc,
            "eval_loss": eval_loss, "eval_acc": eval_acc,
            "lr": self.p.scheduler.get_last_lr()[0],
            "samples_per_s": st.seen / max(st.elapsed, 1e-9), "seconds": st.elapsed,
        }
        st.history.append(entry)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.loss_steps, st.correct, st.seen, st.elapsed = [], 0, 0, 0.0
        if self.info.is_main:
            log.info("epoch %d/%d done: train loss %.4f acc %.4f | eval loss %.4f acc %.4f | "
                     "lr %.4g | %.0f samples/s | %.1fs", entry["epoch"], cfg.epochs, train_loss,
                     train_acc, eval_loss, eval_acc, entry["lr"], entry["samples_per_s"],
                     entry["seconds"])

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Loss and accuracy over the whole test set, each sample once, sharded over ranks."""
        info, model = self.info, self.p.model
        if info.is_distributed:
            # BatchNorm running stats drift apart per rank after the last forward; rank 0's
            # are the model's (they are what is checkpointed).
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)
        model.eval()
        sampler = EvalShardSampler(len(self.p.test_set), info.world_size, info.rank)
        loader = DataLoader(self.p.test_set, batch_size=max(self.per_rank_batch, 256),
                            sampler=sampler, num_workers=self.cfg.num_workers,
                            worker_init_fn=ignore_stop_signals,
                            pin_memory=info.device.type == "cuda")
        totals = torch.zeros(3, dtype=torch.float64, device=info.device)
        for x, y, _ in loader:
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            out = model(x)
            totals[0] += self.loss_fn(out, y).double()
            totals[1] += (out.argmax(1) == y).sum()
            totals[2] += len(y)
        self.coll.sum_(totals)
        model.train()
        n = max(float(totals[2]), 1.0)
        return float(totals[0]) / n, float(totals[1]) / n

    def _after_epoch_save(self) -> int | None:
        cfg, st = self.cfg, self.state
        stop = getattr(self, "_pending_stop", None)
        self._pending_stop = None
        # A signal may have reached any rank during evaluation: agree before deciding.
        preempt, _timed, storage_failed = self.coll.agree_flags(self._flags())
        if storage_failed:
            return self._storage_failed_exit()
        if preempt:
            stop = "preempt"
        final = st.epoch >= cfg.epochs
        hit_max = bool(cfg.max_steps) and st.step >= cfg.max_steps
        blocking = final or stop is not None or hit_max
        if stop == "preempt":
            return self._preempt_exit(self._save(blocking=True, reason="epoch",
                                                 timeout=self._emergency_timeout()))
        ok = self._save(blocking=blocking, reason="epoch")
        if blocking and not ok:
            ok = self._retry_blocking_save()
            if not ok:
                return self._storage_failed_exit()
        if hit_max and not final:
            if self.info.is_main:
                log.info("reached --max-steps %d at step %d; stopping", cfg.max_steps, st.step)
            return exitcodes.OK
        return None

    # ------------------------------------------------------------------ saving
    def _save(self, blocking: bool, reason: str, timeout: float | None = None) -> bool:
        """Collective: every rank calls it; rank 0 snapshots and persists. ``timeout``: a
        blocking save not done by then counts as failed (and is left running)."""
        snapshot = self._state_for_save() if self.state.batch_in_epoch else self.state
        self._last_save_time = time.monotonic()
        ok = True
        if self.ckpt is not None:
            train_state = dict(snapshot.to_dict(), **self._static_meta())
            manifest = {k: train_state[k] for k in ("epoch", "batch_in_epoch", "world_size",
                                                    "global_batch_size", "seed",
                                                    "config_digest", "model_args")}
            manifest["reason"] = reason
            tensors = {"model": self.p.model.state_dict(),
                       "optimizer": self.p.optimizer.state_dict(),
                       "scheduler": self.p.scheduler.state_dict()}
            try:
                result = self.ckpt.save(self.state.step, tensors, train_state, manifest,
                                        blocking=blocking, timeout=timeout)
            except SaveTimeout as e:
                log.error("%s", e)
                self._abandoned_save = True
                result = False
            ok = bool(result) if blocking else True
        if blocking:
            ok = bool(self.coll.agree_flags([0 if ok else 1])[0] == 0) if self.info.is_distributed \
                else ok
        return ok

    def _static_meta(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"seed": cfg.seed, "world_size": self.info.world_size,
                "global_batch_size": cfg.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "config": cfg.to_dict(), "config_digest": cfg.digest(),
                "model_args": self.p.model_args,
                "seeds": {"base": cfg.seed, "init": init_seed(cfg.seed),
                          "epoch": "mix_seed(seed, epoch, rank)",
                          "step": "mix_seed(seed, epoch, batch, rank, 0x57E9)",
                          "data_order": "mix_seed(seed, epoch)",
                          "augmentation": "mix_seed(seed, epoch, sample_index)"}}

    def _retry_blocking_save(self) -> bool:
        for attempt in range(1, self.cfg.max_failed_saves):
            delay = min(30.0, 2.0 * 2 ** (attempt - 1))
            if self.info.is_main:
                log.warning("retrying the checkpoint in %.0fs (attempt %d/%d)", delay, attempt + 1,
                            self.cfg.max_failed_saves)
            time.sleep(delay)
            if self._save(blocking=True, reason="retry"):
                return True
        return False

    def _stop_mid_epoch(self, why: str) -> int:
        st = self.state
        if why == "preempt":
            return self._preempt_exit(self._save(blocking=True, reason="preempt",
                                                 timeout=self._emergency_timeout()))
        ok = self._save(blocking=True, reason="max_steps")
        if not ok and not self._retry_blocking_save():
            return self._storage_failed_exit()
        if self.info.is_main:
            log.info("reached --max-steps %d at step %d; stopping", self.cfg.max_steps, st.step)
        return exitcodes.OK

    def _emergency_timeout(self) -> float:
        """What is left of --preemption-deadline, counted from this rank's signal (from now
        when the signal reached another rank)."""
        start = self.signals.received_at or time.monotonic()
        return max(0.0, self.cfg.preemption_deadline - (time.monotonic() - start))

    def _preempt_exit(self, saved: bool = True) -> int:
        """No retries when preempted: the grace period is short, and a failed emergency
        checkpoint costs only the steps since the last committed one."""
        code = self.signals.exit_code()
        if saved:
            if self.info.is_main:
                log.warning("stopped at step %d after an emergency checkpoint; exit %d "
                            "(retryable): rerun the same command to resume", self.state.step,
                            code)
            return code
        abandoned = getattr(self, "_abandoned_save", False)
        if self.info.is_main:
            last = self.ckpt.last_committed_step if self.ckpt is not None else None
            log.error("EMERGENCY CHECKPOINT AT STEP %d %s; exiting %d (retryable) without it: "
                      "the rerun resumes from the newest committed checkpoint (%s)",
                      self.state.step, f"MISSED --preemption-deadline "
                      f"{self.cfg.preemption_deadline:g}s" if abandoned else "FAILED", code,
                      f"step {last}" if last is not None else "from an earlier run, if any")
        if abandoned:
            # The write goes on in a thread that interpreter shutdown would wait for; a partial
            # checkpoint is invisible (no manifest), so leave now.
            exitcodes.record(code)
            logging.shutdown()
            os._exit(code)
        return code

    def _storage_failed_exit(self) -> int:
        if self.info.is_main:
            log.error("checkpoints failed %d times in a row; exiting with %d (retryable) so the "
                      "job restarts once storage is back", self.cfg.max_failed_saves,
                      exitcodes.STORAGE_FAILED)
        return exitcodes.STORAGE_FAILED
