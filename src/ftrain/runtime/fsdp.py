"""``--parallel fsdp``: the task's model built on the meta device, sharded with FSDP2
(``fully_shard``), materialised and initialised deterministically, then loaded from a sharded
checkpoint.

No rank ever holds the whole model. The model is built on the meta device (shapes, no
memory), its shard units are wrapped with ``fully_shard`` (the task's ``shard_units``), and
``to_empty`` gives each rank the memory of its own shards only. Initialisation is per module:
a meta copy of the model is built once more, and for each module that owns parameters or
buffers (children before parents) that module alone is materialised on the CPU at full size,
initialised by its ``reset_parameters()`` under a seed derived from ``(seed, module name)``,
and each rank keeps the slice of every tensor it owns (a floating-point tensor the
initialiser leaves alone is refused: it would hold whatever the memory held). Transient
memory: one module's tensors. The result does not depend on the world size (or on the
device), so a run on 2 ranks starts from the same weights as one on 4; it differs from
``--parallel ddp``'s init, which builds the whole model under one seed.

World size 1 (one process, or torchrun with one worker): the model is the plain module built
and initialised the same way, with no FSDP wrapping (nothing to shard across, and no process
group is needed); its checkpoints are sharded checkpoints of one shard, which resume on any
world size.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator

import torch
from torch import nn

from ..data.items import mix_seed
from ..tasks import Task
from .distributed import DistInfo
from .exitcodes import InputError

log = logging.getLogger(__name__)

def _reset_fn(module: nn.Module):
    """The module's own initialiser: ``reset_parameters`` (torch's layers), or
    ``_reset_parameters`` (nn.MultiheadAttention, nn.Transformer)."""
    return getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in module.named_parameters(recurse=False):
        yield name, p
    for name, b in module.named_buffers(recurse=False):
        if b is not None:
            yield name, b


def module_seed(seed: int, name: str) -> int:
    """Seed of one module's initialisation (a stable hash of its name: no Python hash())."""
    return mix_seed(seed, 0xF5D9, zlib.crc32(name.encode()))


def build_model(task: Task, seed: int, info: DistInfo) -> nn.Module:
    """The task's model, sharded over the world (plain at world size 1), on ``info.device``,
    initialised from ``seed``. Raises InputError when the model cannot be initialised from
    the meta device (a module with parameters or buffers and no ``reset_parameters``)."""
    with torch.device("meta"):
        model = task.build_model()
    check_initialisable(model)
    if info.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        units = task.shard_units(model)
        for unit in units:
            if unit is not model:
                fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device=info.device)
    initialise(model, task, seed)
    return model


def _describe(name: str, module: nn.Module, tensors: list[str]) -> str:
    return f"{name or '<root>'} ({type(module).__name__}: {', '.join(tensors)})"


def check_initialisable(model: nn.Module) -> None:
    """Every module that owns parameters or buffers must be able to initialise them. Raises
    InputError naming each module that cannot, with its tensors."""
    missing = [_describe(name, m, [t for t, _ in _own_tensors(m)])
               for name, m in model.named_modules()
               if any(True for _ in _own_tensors(m)) and _reset_fn(m) is None]
    if missing:
        raise InputError("--parallel fsdp builds the model on the meta device, where what "
                         "__init__ computes is lost, and initialises each module that owns "
                         "parameters or buffers with its reset_parameters(); these modules "
                         "have none: " + "; ".join(missing) + ". Add to each a "
                         "reset_parameters(self) that initialises the tensors listed (its "
                         "own; its children have theirs), or use --parallel ddp (see "
                         "docs/guide/tasks.md, 'Under --parallel fsdp')")


@torch.no_grad()
def initialise(model: nn.Module, task: Task, seed: int) -> None:
    """Initialise ``model`` (sharded or plain, already materialised) module by module: a full
    size copy of one module at a time on the CPU, seeded from ``(seed, module name)``; each
    rank copies the slices it owns."""
    with torch.device("meta"):
        shadow = task.build_model()
    targets = dict(model.named_modules())
    # Children before parents, as construction initialises them (a parent's initialiser may
    # set its own tensors after its children's).
    for name, module in reversed(list(shadow.named_modules())):
        own = list(_own_tensors(module))
        if not own:
            continue
        module.to_empty(device="cpu", recurse=False)
        for _, t in _own_tensors(module):
            if t.is_floating_point():
                t.fill_(float("nan"))  # what the initialiser leaves alone stays NaN
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, name))
            _reset_fn(module)()
        # Uninitialised memory would differ between ranks and runs, silently.
        left = [t for t, full in _own_tensors(module) if full.is_floating_point()
                and bool(full.isnan().any())]
        if left:
            raise InputError(f"--parallel fsdp: {_describe(name, module, left)}: its "
                             f"{_reset_fn(module).__name__}() leaves these uninitialised "
                             "(NaN); make it initialise every parameter and buffer the module "
                             "owns itself, including those __init__ computes (a constant "
                             "buffer, a mask)")
        target = targets[name]
        for tname, full in _own_tensors(module):
            copy_owned_slice(full, getattr(target, tname))
        module.to_empty(device="meta", recurse=False)  # free the full-size copy


def copy_owned_slice(full: torch.Tensor, target: torch.Tensor) -> None:
    """Copy into ``target`` (a DTensor shard, or a plain tensor) its part of ``full``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(target, DTensor):
        target.copy_(full)
        return
    local = target.to_local()
    piece = full
    mesh = target.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank holds no part of it
        return
    for mesh_dim, placement in enumerate(target.placements):
        if isinstance(placement, Shard):
            # torch.chunk semantics, as DTensor and FSDP2 shard (the last chunks may be short
            # or empty).
            chunks = torch.chunk(piece, mesh.size(mesh_dim), dim=placement.dim)
            i = coord[mesh_dim]
            piece = chunks[i] if i < len(chunks) else piece.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise RuntimeError(f"cannot initialise a parameter placed as {placement}")
    if piece.shape != local.shape:
        raise RuntimeError(f"shard of shape {tuple(local.shape)} does not match its slice "
                           f"{tuple(piece.shape)} of the full tensor {tuple(full.shape)}")
    local.copy_(piece)


def load_sharded(loaded, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into ``model`` (sharded or plain) and
    ``optimizer``: every rank reads the chunks it needs, whatever world size wrote them
    (collective when distributed). Raises StorageError (storage unreachable) or
    ShardedCheckpointError (it does not fit)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ..checkpoint.dcp import ShardedCheckpointError, describe_failure, first_failure
    from ..checkpoint.dcp_read import SafeLoadPlanner, ShardReader
    from ..storage import StorageError

    # The templates: this rank's shards, keyed by parameter name (get_state_dict creates the
    # optimizer's state first, by a step with zero gradients and lr 0, so its keys exist).
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, storage_reader=ShardReader(loaded.storage, loaded.name, loaded.dcp,
                                                   verified=loaded.verified),
                 planner=SafeLoadPlanner())
    except CheckpointException as e:
        cause = first_failure(e)
        if isinstance(cause, StorageError):
            raise StorageError(describe_failure(f"loading {loaded.uri}", e)) from None
        raise ShardedCheckpointError(describe_failure(f"loading {loaded.uri}", e)) from None
    finally:
        loaded.verified.clear()  # what the load did not take is not needed any more
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_whole(loaded, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a ddp checkpoint (one whole state file, the optimizer's state keyed by parameter
    index) into the sharded ``model``: each rank keeps its slices of the whole tensors (every
    rank has mapped the file already; nothing new is allocated at full size but transiently,
    per tensor)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    optim = by_parameter_name(loaded.state["optimizer"], optimizer, model)
    set_state_dict(model, optimizer, model_state_dict=loaded.state["model"],
                   optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))


def load_optimizer_whole(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """A whole optimizer state (a plain script's, keyed by parameter index) into the sharded
    optimizer: each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(model, optimizer, by_parameter_name(saved, optimizer, model),
                             options=StateDictOptions(full_state_dict=True))


def by_parameter_name(saved: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A ``torch.optim`` state dict keyed by parameter index, re-keyed by parameter name: the
    i-th parameter of each saved group is the i-th of this optimizer's same group (the task
    builds both optimizers the same way)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups,
                                                                 strict=True)):
        raise ValueError("the checkpoint's optimizer has other parameter groups than this "
                         "run's")
    index = {i: names[id(p)] for g, h in zip(groups, optimizer.param_groups, strict=True)
             for i, p in zip(g["params"], h["params"], strict=True)}
    return {"state": {index[i]: s for i, s in saved["state"].items()},
            "param_groups": [dict(g, params=[index[i] for i in g["params"]]) for g in groups]}


def load_full_model(loaded, model: nn.Module) -> None:
    """One process, no process group: load a sharded checkpoint's model weights, whole, into
    the plain ``model`` (for ``ckpt export`` and ``predict``). Raises ShardedCheckpointError
    when they do not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException

    from ..checkpoint.dcp import ShardedCheckpointError, describe_failure
    from ..checkpoint.dcp_read import SafeLoadPlanner, ShardReader

    state = {"model": model.state_dict()}
    try:
        dcp.load(state, storage_reader=ShardReader(loaded.storage, loaded.name, loaded.dcp),
                 planner=SafeLoadPlanner(), no_dist=True)
    except (CheckpointException, RuntimeError, ValueError) as e:
        raise ShardedCheckpointError(describe_failure(f"loading {loaded.uri}", e)) from None
    model.load_state_dict(state["model"])
