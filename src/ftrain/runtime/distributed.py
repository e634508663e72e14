"""torchrun / single-process detection, device and backend choice, and the small collectives
the trainer needs (agreement on preemption and timed saves, metric reductions)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# torch >= 2.13 deprecates the name all_gather_into_tensor (used by exchange.StepExchange, the
# only one torch 2.10/2.11 have); one warning per step per rank buries the progress lines.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                        category=FutureWarning)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """Global rank from the environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def choose_device(preference: str, local_rank: int) -> torch.device:
    """Raises ValueError naming --device when CUDA is asked for but absent."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU ({count} visible): start at most "
                             f"{count} processes per node or use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` when the launcher dies.

    torchrun starts each worker in a session of its own, so a SIGKILL of torchrun's process
    group (or of torchrun alone) leaves the workers running, training on and writing
    checkpoints next to the restarted job. With this they get SIGTERM instead: emergency
    checkpoint, then exit.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
            return
        if os.getppid() != parent:  # the launcher died before the request took effect
            os.kill(os.getpid(), sig)
    except (OSError, AttributeError) as e:
        log.debug("cannot set the parent-death signal: %s", e)


def setup(device_preference: str, timeout_s: float) -> DistInfo:
    """Start the process group when launched by torchrun; otherwise a single process."""
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, choose_device(device_preference, 0), None)
    die_with_parent()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}),
                            **_attempt_store(rank, world, timeout_s))
    return DistInfo(rank, world, local_rank, device, backend)


def _attempt_store(rank: int, world: int, timeout_s: float) -> dict:
    """Under torchrun's agent store, a key space of this restart attempt's own.

    The agent keeps one store for all ``--max-restarts`` attempts (static rendezvous, and c10d
    unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), so restarted workers would read the dead
    group's addresses and fail ("Gloo connectFullMesh failed ... Connection refused").
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store, _, _ = next(dist.rendezvous("env://", rank, world,
                                       timeout=timedelta(seconds=timeout_s)))
    return {"store": dist.PrefixStore(f"ftt/restart{attempt}", store), "rank": rank,
            "world_size": world}


class Collectives:
    """Reductions the trainer needs, all no-ops at world size 1.

    Control messages (preemption, timed save) travel on a gloo group so that agreeing on them
    never synchronises the GPU stream.
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._control = None
        if info.is_distributed:
            # Its own group even under gloo: its async all-reduces never queue behind DDP's.
            self._control = dist.new_group(backend="gloo")

    def _ctrl_group(self):
        return self._control

    def start_agree(self, flags: list[int]) -> _Pending:
        """Start an element-wise max of ``flags`` over ranks; ``.result()`` waits for it.

        The loop starts one per step and reads it a step later, so agreement costs no wait.
        """
        t = torch.tensor(flags, dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl_group(), async_op=True)
        return _Pending(work, t)

    def agree_flags(self, flags: list[int]) -> list[int]:
        """Element-wise maximum of ``flags`` over all ranks (CPU, gloo)."""
        if not self.info.is_distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctrl_group())
        return [int(x) for x in t.tolist()]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor on this rank's device."""
        if self.info.is_distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Stack ``t`` from every rank: shape (world, *t.shape), in rank order."""
        if not self.info.is_distributed:
            return t.unsqueeze(0)
        out = [torch.empty_like(t) for _ in range(self.info.world_size)]
        dist.all_gather(out, t)
        return torch.stack(out)

    def all_equal(self, value: int) -> bool:
        """True when every rank passed the same integer."""
        if not self.info.is_distributed:
            return True
        lo_hi = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX, group=self._ctrl_group())
        return int(lo_hi[0]) == value and int(-lo_hi[1]) == value

    def broadcast_object(self, obj):
        if not self.info.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._ctrl_group())
        return box[0]

    def gather_objects(self, obj):
        """``obj`` from every rank, in rank order, on every rank (control group)."""
        if not self.info.is_distributed:
            return [obj]
        out = [None] * self.info.world_size
        dist.all_gather_object(out, obj, group=self._ctrl_group())
        return out

    def barrier(self) -> None:
        if self.info.is_distributed:
            dist.barrier(group=self._ctrl_group())


class _Pending:
    def __init__(self, work, tensor: torch.Tensor) -> None:
        self._work, self._tensor, self._done = work, tensor, False

    def result(self) -> list[int]:
        if not self._done:
            self._work.wait()
            self._done = True
        return [int(x) for x in self._tensor.tolist()]


def peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is how a collective fails when a peer died or timed out (gloo, NCCL)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Gloo", "gloo", "NCCL",
                            "Connection reset"))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
