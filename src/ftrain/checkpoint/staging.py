"""Host staging of a checkpoint: the state copied into preallocated, reused host buffers
(pinned when it lives on a GPU), so that a save blocks the loop only for a memcpy."""

from __future__ import annotations

import sys
from typing import Any

import torch


class HostBuffers:
    """Preallocated host buffers the state is copied into (pinned when it lives on a GPU), so
    the loop is blocked only for a memcpy; the buffers are reused from save to save."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, obj: Any, key: str = "") -> Any:
        if _is_dtensor(obj):
            return self._copy_dtensor(obj, key)
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:  # sparse: no buffer to copy into; a fresh copy
                return obj.detach().to("cpu", copy=True)
            buf = self.buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                pin = obj.device.type == "cuda"
                buf = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=pin)
                self.buffers[key] = buf
            buf.copy_(obj.detach(), non_blocking=True)
            return buf
        if isinstance(obj, dict):
            return {k: self.copy(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj

    def _copy_dtensor(self, obj: Any, key: str) -> Any:
        """This rank's shard of a DTensor into a host buffer, kept as a DTensor with the same
        mesh and placements, so that DCP knows where the shard sits in the whole tensor."""
        local = obj.to_local()
        shell = self.buffers.get(key)
        if shell is None or shell.shape != obj.shape or shell.dtype != obj.dtype or \
                shell.placements != obj.placements or shell.to_local().shape != local.shape:
            # The first snapshot allocates: a CPU copy of the DTensor (same mesh, placements,
            # global shape), whose local tensor is the buffer from then on.
            shell = obj.detach().to("cpu", copy=True)
            if local.device.type == "cuda":
                # Private: DTensor has no public way to swap its local tensor for a pinned one
                # (from_local moves it back to the mesh's device); torch's own staging for
                # async_save does the same (torch/distributed/_state_dict_utils.py).
                shell._local_tensor = shell._local_tensor.pin_memory()
            self.buffers[key] = shell
        shell.to_local().copy_(local.detach(), non_blocking=True)
        return shell


def _is_dtensor(obj: Any) -> bool:
    # Never imported here (0.6 s on the first save): a DTensor exists only once it is. (It may
    # be half-imported by another thread, before DTensor is defined: then none exists yet.)
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(obj, cls)
