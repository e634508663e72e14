"""This rank's batches: the training batches of the rest of an epoch (gathered on the device
from the sampler's indices, or through a DataLoader) and the evaluation loader; autocast and
micro-batches."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from ..config import Config
from ..data.items import EpochTagged, SeededItems, TensorItems, collate_rows, mix_seed
from ..data.sampler import EvalShardSampler, ResumableDistributedSampler
from ..runtime.control import ignore_stop_signals
from ..runtime.distributed import DistInfo

log = logging.getLogger(__name__)

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


class _IndexedCollate:
    """The task's collate_fn over the items of ``(item, index)`` rows; the indices stay a
    tensor beside the batch (picklable, for loader workers)."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, rows: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        return (self.collate_fn([item for item, _ in rows]),
                torch.tensor([index for _, index in rows], dtype=torch.int64))


class Batches:
    """This rank's share of every global batch, and of the evaluation set."""

    def __init__(self, cfg: Config, info: DistInfo, train_set: Dataset, test_set: Dataset,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        """``collate_fn``: the task's (a list of items -> a batch); the DataLoader then makes
        every batch, training batches too."""
        self.cfg, self.info = cfg, info
        self.collate_fn = collate_fn
        # Without a task's collate_fn, a tensor dataset's batches are gathered whole.
        self.train_items = SeededItems(train_set, cfg.seed, gather=collate_fn is None)
        self.sampler = ResumableDistributedSampler(self.train_items, info.world_size, info.rank,
                                                   cfg.batch_size, cfg.seed)
        self.eval_items = SeededItems(test_set, cfg.seed, gather=collate_fn is None)
        self.eval_sampler = EvalShardSampler(len(self.eval_items), info.world_size, info.rank)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.per_rank_batch = cfg.batch_size // info.world_size
        self.on_device = None if collate_fn is not None else device_tensors(
            train_set, info.device, cfg.data_on_device)
        # --eval-batch-size, per rank; 0: the per-rank training batch, at least 256.
        self.eval_batch = cfg.eval_batch_size or max(self.per_rank_batch, 256)
        # Built by start(); with --num-workers their workers live as long as the run.
        self.train_loader: DataLoader | None = None
        self.eval_loader: DataLoader | None = None

    def start(self) -> None:
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
        self.eval_loader = self._new_loader(self.eval_items, self.eval_sampler,
                                            self.eval_batch, False, 0xE7A1,
                                            pin_memory=False)
        if self.on_device is None:
            self.train_loader = self._new_loader(self.train_items, self.sampler,
                                                 self.per_rank_batch, True, 0x10AD,
                                                 pin_memory=cuda)
        if not self.cfg.num_workers:
            return
        for loader in (self.eval_loader, self.train_loader):
            if loader is None:
                continue
            tagged = loader.sampler
            assert isinstance(tagged, EpochTagged)
            tagged.idle = True
            try:
                iter(loader)  # forks the workers, gives them nothing to do yet
            finally:
                tagged.idle = False

    def stop(self) -> None:
        """Drop the loaders: the last reference to each stops its workers."""
        self.train_loader = self.eval_loader = None

    def _new_loader(self, items: SeededItems, sampler: Sampler, batch_size: int,
                    drop_last: bool, salt: int, pin_memory: bool) -> DataLoader:
        workers = self.cfg.num_workers
        collate = (_IndexedCollate(self.collate_fn) if self.collate_fn is not None
                   else collate_rows)
        return DataLoader(items, batch_size=batch_size, sampler=EpochTagged(sampler, items),
                          num_workers=workers, drop_last=drop_last, collate_fn=collate,
                          worker_init_fn=ignore_stop_signals, pin_memory=pin_memory,
                          persistent_workers=workers > 0,
                          # The loader's base seed (for its workers, whose items SeededItems
                          # seeds anyway) comes from here, not from the global torch RNG.
                          generator=torch.Generator().manual_seed(
                              mix_seed(self.cfg.seed, self.info.rank, salt)))

    def train(self, epoch: int, start: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """This rank's batches of epoch ``epoch`` from global batch ``start`` on:
        ``((inputs, targets), indices)`` (indices None for batches gathered on the device,
        unless --trace-samples records them). Neither way draws from the global RNGs: a model's
        randomness does not depend on --data-on-device or --num-workers."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        if self.on_device is None:
            self.train_items.set_epoch(epoch)
            assert self.train_loader is not None, "start() builds the loaders"
            return iter(self.train_loader)
        return self._gathered()

    def _gathered(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """Batches gathered from tensors already on the device, by the sampler's indices: no
        DataLoader, no per-item Python, no host-to-device copy per step. The indices come
        with a batch only where --trace-samples records them (None otherwise)."""
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        x, y = self.on_device
        on_dev = order.to(self.info.device)
        traced = bool(self.cfg.trace_samples)
        for b in range(len(order) // self.per_rank_batch):
            cut = slice(b * self.per_rank_batch, (b + 1) * self.per_rank_batch)
            rows = on_dev[cut]
            yield (x[rows], y[rows]), order[cut] if traced else None

    def evaluation(self, epoch: int) -> DataLoader:
        """This rank's share of the evaluation set (every item once over the ranks)."""
        self.eval_items.set_epoch(epoch)
        assert self.eval_loader is not None, "start() builds the loaders"
        return self.eval_loader
