"""The training loop. Owns epoch, step, position in the epoch, the running metric sums and the
metric history; reseeds. Batches come from batching.py, evaluation from evaluate.py. When to
save is the SavePolicy's business, when to stop the StopControl's; the loop asks them at every
step boundary."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint.format import TrainState
from ..checkpoint.policy import SavePolicy
from ..config import Config
from ..errors import InputError
from ..runtime.distributed import Collectives, DistInfo, peer_failure
from ..runtime.exchange import StepExchange
from ..runtime.monitor import Monitor
from ..tasks import Task
from .batching import AUTOCAST, Batches, autocast, split_batch, to_device
from .evaluate import evaluate
from .rng import StepSeeder
from .stopping import Stopping
from .sums import MetricSums, split_loss
from .survivor import after_peer_failure

log = logging.getLogger(__name__)


@dataclass
class Parts:
    model: nn.Module  # unwrapped, on its device
    ddp: nn.Module  # what forward/backward go through (DDP or the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: Dataset  # the task's datasets
    test_set: Dataset
    scaler: torch.amp.GradScaler | None = None  # --precision fp16 only
    exchange: StepExchange | None = None  # DDP's comm hook, when it carries the step's state


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, coll: Collectives, task: Task, parts: Parts,
                 state: TrainState, saver: SavePolicy, monitor: Monitor) -> None:
        self.cfg, self.info, self.coll, self.task, self.p = cfg, info, coll, task, parts
        self.monitor = monitor
        self.state = state
        self.saver = saver
        self.stopping = Stopping(cfg, info, state, saver)
        self.batches = Batches(cfg, info, parts.train_set, parts.test_set, task.collate_fn)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.per_rank_batch = self.batches.per_rank_batch
        # Looked up once, not every step: DDP's no_sync (None: a plain module, or FSDP), the
        # autocast dtype (None: fp32), whether batches arrive on the device already.
        self._no_sync = getattr(parts.ddp, "no_sync", None)
        self._amp = AUTOCAST[cfg.precision]
        self._moved = self.batches.on_device is not None
        self._compiling = cfg.compile != "off"  # the first step compiles (--compile)
        # The exchange all-reduces on a bucket layout pinned before the first step.
        self._pin_layout = parts.exchange is not None
        self._pinned_s = 0.0
        self._grad_norm: torch.Tensor | None = None  # the newest step's, with --clip-grad-norm
        self.start_step = state.step  # what this run resumed from
        self.epoch_t0 = time.perf_counter()  # when the epoch's part in ``elapsed`` started
        # This run's per-step metric sums on this rank, not yet folded into the state.
        self.sums = MetricSums(coll, info.device, list(state.sums), type(task).__name__,
                               exchanged=parts.exchange is not None)
        self._trace = None
        if cfg.trace_samples:
            os.makedirs(cfg.trace_samples, exist_ok=True)
            path = os.path.join(cfg.trace_samples, f"rank{info.rank}-pid{os.getpid()}.jsonl")
            self._trace = open(path, "a", buffering=1)  # noqa: SIM115 - closed in fit()

    # ------------------------------------------------------------------ public
    def fit(self) -> None:
        """Train to ``--epochs`` (or ``--max-steps``). Raises Preempted or Interrupted after a
        signal (with or without the emergency checkpoint), StorageError when checkpoints keep
        failing."""
        try:
            self.batches.start()
            return self._fit()
        except RuntimeError as e:
            if not peer_failure(e):
                raise
            after_peer_failure(self, e)
        finally:
            self.monitor.end_epoch()
            self.batches.stop()
            if self._trace:
                self._trace.close()

    def _fit(self) -> None:
        cfg, st = self.cfg, self.state
        if self.stopping.already_stopped():
            return
        while st.epoch < cfg.epochs:
            outcome = self._run_epoch()
            if outcome == "stopped":
                return
            self._end_epoch()
            if self._after_epoch(outcome):
                return
        if self.info.is_main:
            log.info("training complete: %d epochs, %d steps", st.epoch, st.step)

    # ------------------------------------------------------------------ epoch
    def _run_epoch(self) -> str | None:
        """Train the rest of the current epoch. Returns "stopped" after a stop mid-epoch
        (--max-steps; a signal raises), or, at the epoch's end, the stop agreed during it
        ("preempt", "max" or None)."""
        cfg, st, info = self.cfg, self.state, self.info
        if st.batch_in_epoch == 0:
            st.sums, st.seen, st.elapsed = {}, 0, 0.0
        self.p.model.train()
        self.epoch_t0 = time.perf_counter()
        t_log, n_log = self.epoch_t0, 0
        self.sums.clear()
        self.saver.start_epoch()
        self.monitor.start_epoch(st.epoch, cfg.epochs, st.batch_in_epoch, self.steps_per_epoch)
        batches = self.batches.train(st.epoch, st.batch_in_epoch)
        seed_step = StepSeeder(cfg.seed, st.epoch, info.rank, info.device)
        if self._eval_pending():  # a peer died in this step's evaluation: it runs now
            decision = self._after_step(False, True)
            if decision.stop is not None:
                return self._stop(decision)
        for (inputs, targets), idx in batches:
            if self._pin_layout:  # this process's first step: not a step, not timed
                t0 = time.perf_counter()
                self._pin_buckets(inputs, targets)
                self._pinned_s = time.perf_counter() - t0  # includes --compile's compilation
                self.epoch_t0 += self._pinned_s
            # Every RNG is seeded before every step from (seed, epoch, batch, rank): the state
            # at any step boundary is derivable, with nothing to save, by any rank.
            seed_step(st.batch_in_epoch)
            if self._compiling:
                self.epoch_t0 += self._first_compiled_step(inputs, targets)
            else:
                self._step(inputs, targets)
            if self._trace:
                self._trace.write(json.dumps({"epoch": st.epoch, "step": st.step + 1,
                                              "batch": st.batch_in_epoch, "rank": info.rank,
                                              "world": info.world_size, "idx": idx.tolist()}) + "\n")
            st.step += 1
            st.batch_in_epoch += 1
            n_log += 1
            self.monitor.step(st.step)
            if cfg.log_every_steps and st.step % cfg.log_every_steps == 0:  # every rank
                self._log_step(n_log * cfg.batch_size / max(time.perf_counter() - t_log, 1e-9))
                t_log, n_log = time.perf_counter(), 0

            last_batch = st.batch_in_epoch == self.steps_per_epoch
            decision = self._after_step(last_batch, bool(
                cfg.eval_every_steps and st.step % cfg.eval_every_steps == 0 and not last_batch))
            if decision.stop is not None:
                return self._stop(decision)
        # Only reached when the loader had nothing left (a resume at the epoch's last batch).
        self.saver.end_epoch()
        self._fold_sums()
        st.elapsed += time.perf_counter() - self.epoch_t0
        return None

    def _after_step(self, last_batch: bool, eval_due: bool):  # -> policy.Decision
        """After a step: the evaluation --eval-every-steps asks for, then the save policy's
        decision (a save, a stop)."""
        evaluated = early = False
        if eval_due:
            self._evaluate_mid_epoch()
            evaluated, early = True, self.stopping.early()
        return self.saver.after_step(
            self.state.step, last_batch,
            lambda: self.progress(time.perf_counter() - self.epoch_t0), evaluated, early)

    def _stop(self, decision) -> str | None:
        """What ``_run_epoch`` returns for a decision that stops the epoch."""
        self.state.elapsed += time.perf_counter() - self.epoch_t0
        if decision.stop == "storage":
            self.stopping.storage_failed()
        if decision.epoch_end:
            self._fold_sums()
            return decision.stop
        return self._stop_mid_epoch(decision.stop)

    def _eval_pending(self) -> bool:
        """Whether the checkpoint this run resumed from was taken before the evaluation inside
        the epoch that its step asks for: the survivors of a peer that died during it
        checkpointed the step (core/survivor.py), and this run evaluates it before the next
        step, as the uninterrupted run did."""
        cfg, st = self.cfg, self.state
        return (st.step == self.start_step and st.step > 0 and bool(cfg.eval_every_steps)
                and st.step % cfg.eval_every_steps == 0
                and 0 < st.batch_in_epoch < self.steps_per_epoch
                and not any(e.get("step") == st.step for e in st.evals))

    def _pin_buckets(self, inputs: Any, targets: Any) -> None:
        """One thrown-away backward pass on the first micro-batch, before this process's first
        step: DDP re-packs its gradient buckets after it, and all-reduces every step on that
        layout, in this process as in any other (runtime/exchange.py). Collective."""
        self._pin_layout = False
        cfg, dev, p, task = self.cfg, self.info.device, self.p, self.task
        x = split_batch(to_device(inputs, dev), cfg.grad_accum)[0]
        y = split_batch(to_device(targets, dev), cfg.grad_accum)[0]
        # What the thrown-away pass may change besides the model's buffers: the task's own
        # checkpointed state, gradients of tensors outside the model.
        task_state = copy.deepcopy(task.state_dict())
        try:
            p.exchange.pin_layout(
                p.ddp, lambda: split_loss(self.sums.owner, self._forward_loss(x, y))[0])
        finally:
            p.optimizer.zero_grad(set_to_none=True)
            task.load_state_dict(task_state)

    def _first_compiled_step(self, inputs: Any, targets: Any) -> float:
        """The run's first step under --compile, timed apart: it includes the compilation,
        which is logged and not counted as training time. Returns its length."""
        t0 = time.perf_counter()
        self._step(inputs, targets)
        seconds = time.perf_counter() - t0
        self._compiling = False
        compiled_in = seconds + self._pinned_s  # the layout's pass compiled it, if it ran
        if self.info.is_main:
            log.info("compiled the model (--compile %s): the first step took %.1fs, not "
                     "counted as training time", self.cfg.compile, compiled_in,
                     extra={"fields": {"event": "compiled", "seconds": compiled_in}})
        return seconds

    def _log_step(self, samples_per_s: float) -> None:
        """The periodic figures of the job (collective, on logging steps only): the newest
        step's metric sums added over the ranks, through the task's metrics over the global
        batch; the gradient norm (with --clip-grad-norm, which computes it); the job's
        samples/s. Rank 0 sends the same numbers to the log (or the progress bar) and every
        outlet of the monitor (Prometheus, TensorBoard, the tracker)."""
        st, cfg = self.state, self.cfg
        sums = self.sums.newest()  # one small all-reduce, unless exchanged
        norm = self._grad_norm
        if norm is not None and hasattr(norm, "full_tensor"):  # FSDP: a DTensor (collective)
            norm = norm.full_tensor()
        if not self.monitor.keeps_points:  # another rank without a tracker's shadow
            return
        metrics = self.task.metrics(dict(zip(self.sums.names, sums.tolist(), strict=True)),
                                    cfg.batch_size)
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        lr = self.p.scheduler.get_last_lr()[0]
        self.monitor.logged(st.step, metrics, lr, samples_per_s)  # every rank: the shadow
        if self.info.is_main and not self.monitor.bar_active:
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
        cfg, p, task = self.cfg, self.p, self.task
        if not self._moved:
            dev = self.info.device
            inputs, targets = to_device(inputs, dev), to_device(targets, dev)
        accum = cfg.grad_accum
        if accum == 1:
            xs, ys = (inputs,), (targets,)
        else:
            xs, ys = split_batch(inputs, accum), split_batch(targets, accum)
        step_sums: torch.Tensor | None = None
        for k in range(accum):
            # Gradients are all-reduced once per step, with the last micro-batch.
            sync = k == accum - 1 or self._no_sync is None
            with contextlib.nullcontext() if sync else self._no_sync():
                loss_value, sums = split_loss(self.sums.owner,
                                              self._forward_loss(xs[k], ys[k]))
                # The mean over this rank's share of the global batch (DDP averages the
                # ranks' gradients): a sum over the micro-batch's items, or their mean.
                loss = (loss_value / accum if task.loss_reduction == "mean"
                        else loss_value / self.per_rank_batch)
                row = self.sums.row(sums)
                step_sums = row if step_sums is None else step_sums + row
                if sync and p.exchange is not None:  # travels with the gradients
                    p.exchange.send(step_sums)
                (p.scaler.scale(loss) if p.scaler is not None else loss).backward()
        if p.scaler is not None:
            p.scaler.unscale_(p.optimizer)  # clip the true gradients
        if cfg.clip_grad_norm:  # the norm before clipping: logged on logging steps
            self._grad_norm = torch.nn.utils.clip_grad_norm_(p.model.parameters(),
                                                             cfg.clip_grad_norm)
        if p.scaler is not None:
            p.scaler.step(p.optimizer)  # skipped when the gradients overflowed
            p.scaler.update()
        else:
            p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        if task.scheduler_interval == "step":
            p.scheduler.step()
        task.after_step(p.model)
        self.sums.append(step_sums if p.exchange is None else p.exchange.completed())

    def _forward_loss(self, x: Any, y: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The task's forward and loss on one micro-batch, under --precision's autocast."""
        task = self.task
        if self._amp is None:
            return task.loss(task.forward(self.p.ddp, x), y)
        with autocast(self.cfg.precision, self.info.device):
            return task.loss(task.forward(self.p.ddp, x), y)

    def _fold_sums(self) -> None:
        """Move this run's running sums into the state (collective)."""
        st = self.state
        st.sums, batches = self.sums.totals(st.sums)
        st.seen += batches * self.cfg.batch_size
        self.sums.clear()

    def progress(self, running_s: float = 0.0) -> dict[str, Any]:
        """The state with the unfinished epoch's sums folded in, without consuming them
        (collective unless every rank holds every rank's sums). ``running_s``: the time
        trained since the epoch's part in ``elapsed`` was last added up. Rank 0's carries
        the tracker's points not yet published (runtime/tracking.py)."""
        st = self.state
        outbox = self.monitor.outbox()
        extra = {"tracker_outbox": outbox} if outbox else {}
        if not st.batch_in_epoch:
            return st.to_dict() | extra
        sums, batches = self.sums.totals(st.sums)
        return TrainState(st.epoch, st.step, st.batch_in_epoch, st.history, sums,
                          st.seen + batches * self.cfg.batch_size, st.elapsed + running_s,
                          st.resumes, st.not_bitwise, st.evals, st.stopped).to_dict() | extra

    # ------------------------------------------------------------------ epoch end
    def _end_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        self.monitor.end_epoch()
        train = self.task.metrics(st.sums, st.seen)
        evaluated = self._evaluate()
        entry: dict[str, Any] = {"epoch": st.epoch + 1, "step": st.step}
        entry.update({f"train_{k}": v for k, v in train.items()})
        entry.update({f"eval_{k}": v for k, v in evaluated.items()})
        entry.update(lr=self.p.scheduler.get_last_lr()[0],
                     samples_per_s=st.seen / max(st.elapsed, 1e-9), seconds=st.elapsed,
                     saves_dropped=self.saver.dropped)  # timing-dependent, like the two above
        if st.not_bitwise:
            entry["not_bitwise"] = list(st.not_bitwise)
            st.not_bitwise = []
        self.stopping.check_best_metric(entry)
        if self.task.scheduler_interval == "epoch":
            self._step_epoch_schedule(entry)
        st.history.append(entry)
        st.epoch += 1
        st.batch_in_epoch = 0
        st.sums, st.seen, st.elapsed = {}, 0, 0.0
        if self.info.is_main:
            log.info("epoch %d/%d done: train %s | eval %s | lr %.4g | %.0f samples/s | %.1fs",
                     entry["epoch"], cfg.epochs, _fmt(train), _fmt(evaluated), entry["lr"],
                     entry["samples_per_s"], entry["seconds"],
                     extra={"fields": {"event": "epoch", **entry}})
        self.monitor.epoch_done(entry)  # every rank: the tracker's shadow

    def _evaluate(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        return evaluate(self.task, self.p.model, self.batches.evaluation(st.epoch),
                        self.batches.eval_items, self.info, self.coll, cfg.precision,
                        cfg.parallel == "fsdp", self.sums.names, self.monitor.beat)

    def _evaluate_mid_epoch(self) -> None:
        """--eval-every-steps: an evaluation inside the epoch (collective), recorded in the
        train state's ``evals``. It draws no random number the training would: a run resumed
        between two of them trains the same steps and records the same evaluations."""
        st = self.state
        entry = {"epoch": st.epoch + 1, "step": st.step,
                 **{f"eval_{k}": v for k, v in self._evaluate().items()}}
        self.stopping.check_best_metric(entry)
        st.evals.append(entry)
        self.monitor.evaluated(entry)
        if self.info.is_main:
            log.info("step %d: eval %s", st.step,
                     _fmt({k[5:]: v for k, v in entry.items() if k.startswith("eval_")}),
                     extra={"fields": {"event": "eval", **entry}})

    def _step_epoch_schedule(self, entry: dict[str, Any]) -> None:
        """An epoch schedule's one step, after evaluation and before the epoch-end checkpoint
        (which holds it): a checkpoint taken mid-epoch holds the schedule before it, so a
        resume steps it exactly once too. ``entry["lr"]`` stays the epoch's own rate."""
        sched = self.p.scheduler
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            name = self.task.scheduler_metric
            if name not in entry:
                raise InputError(f"{type(self.task).__name__}.scheduler_metric {name!r} is not "
                                 f"in the epoch's history entry ({', '.join(sorted(entry))})")
            sched.step(entry[name])
        else:
            sched.step()

    def _after_epoch(self, stop: str | None) -> bool:
        """The epoch end's save; True when training stops here (--max-steps)."""
        cfg, st = self.cfg, self.state
        # A signal may have reached any rank during evaluation: agree before deciding.
        decision = self.saver.agree_now()
        if decision.storage_failed:
            self.stopping.storage_failed()
        if decision.preempt:
            stop = "preempt"
        final = st.epoch >= cfg.epochs
        hit_max = bool(cfg.max_steps) and st.step >= cfg.max_steps
        if stop == "preempt":
            self.stopping.on_signal(self._emergency_save("epoch"))
        early = not final and self.stopping.early()
        if final or stop is not None or hit_max or early:
            if not self.saver.save_blocking(self.progress(), st.step,
                                            reason="early_stop" if early else "epoch"):
                self.stopping.storage_failed()
        else:
            self.saver.save(self.progress(), st.step, blocking=False, reason="epoch")
        if early:
            self.stopping.log_early()
            return True
        if hit_max and not final:
            self.stopping.log_max_steps()
            return True
        return False

    # ------------------------------------------------------------------ stopping
    def _emergency_save(self, reason: str) -> bool:
        return self.saver.emergency_save(self.progress, self.state.step, reason)

    def _stop_mid_epoch(self, why: str) -> str:
        st = self.state
        if why == "preempt":
            self.stopping.on_signal(self._emergency_save("preempt"))
        reason = "early_stop" if why == "early" else "max_steps"
        if not self.saver.save_blocking(self.progress(), st.step, reason=reason):
            self.stopping.storage_failed()
        if why == "early":
            self.stopping.log_early()
        else:
            self.stopping.log_max_steps()
        return "stopped"


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
