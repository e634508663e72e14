"""Plain PyTorch checkpoints, the ``.pth`` files of plain scripts, in both directions.

In (``--init-from FILE|URI``), loaded with ``weights_only=True`` (nothing in them runs):

- a bare ``state_dict`` (every value a tensor): the model's initial weights, for fine-tuning;
- a script's dict (``{"epoch", "model_state_dict", "optimizer_state_dict",
  "scheduler_state_dict", "loss", "acc", ...}``): the model, the optimizer and the schedule,
  and training continues at the next epoch start, the file's records in the history. Its
  ``epoch`` is read as the epochs done. Not bitwise: a plain script kept no RNG states or
  data position.
- a pickled whole model (``torch.save(model)``) is refused: loading it would run code.

Out (``ckpt export --format full``): the same dict shape, CPU tensors, for a plain script's
``torch.load(..., map_location=...)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..storage import Storage, StorageError, checksum

MODEL_KEYS = ("model_state_dict", "state_dict", "model")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer")
SCHEDULER_KEYS = ("scheduler_state_dict", "scheduler", "lr_scheduler")


@dataclass
class Plain:
    """What a plain file holds, recognised by its shape."""

    uri: str
    digest: str  # XXH3-128 of the file's bytes: recorded in checkpoints, compared on resume
    model: dict[str, torch.Tensor]
    full: bool = False  # a script's dict, not a bare state_dict
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    epochs_done: int = 0
    records: dict[str, float] = field(default_factory=dict)  # its plain numbers (loss, acc)


def _first(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((d[k] for k in keys if k in d), None)


def load_plain(uri: str, options: dict[str, Any] | None = None) -> Plain:
    """The plain checkpoint at ``uri`` (a local path or s3://...). InputError for a file that
    is missing, unsafe or of no known shape; StorageError when storage fails."""
    head, _, name = uri.rstrip("/").rpartition("/")
    try:
        raw = Storage(head or ".", options).read(name)
    except FileNotFoundError:
        raise InputError(f"--init-from {uri}: no such file") from None
    except StorageError as e:
        raise StorageError(f"--init-from {uri}: {e}") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for pickled objects, bad zips
        raise InputError(
            f"--init-from {uri}: cannot be loaded safely ({type(e).__name__}: {str(e)[:200]}). "
            "A whole pickled model (torch.save(model)) would run code when loaded; save its "
            "weights instead: torch.save(model.state_dict(), PATH)") from None
    if not isinstance(obj, dict):
        raise InputError(f"--init-from {uri}: holds a {type(obj).__name__}, not a state_dict "
                         "or a dict with 'model_state_dict'")
    plain = Plain(uri, checksum(raw), {})
    model = _first(obj, MODEL_KEYS)
    if isinstance(model, dict):  # a script's dict
        plain.model, plain.full = model, True
        plain.optimizer = _first(obj, OPTIMIZER_KEYS)
        plain.scheduler = _first(obj, SCHEDULER_KEYS)
        plain.epochs_done = int(obj.get("epoch", 0) or 0)
        plain.records = {k: float(v) for k, v in obj.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and k != "epoch"}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        plain.model = obj
    else:
        raise InputError(f"--init-from {uri}: neither a state_dict (every value a tensor) nor a "
                         f"dict with one of {', '.join(MODEL_KEYS)} (its keys: "
                         f"{', '.join(sorted(map(str, obj))[:12])})")
    return plain


def full_export(model: dict[str, torch.Tensor], state: dict[str, Any],
                train_state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as a plain script saves one: ``epoch`` (epochs done), the three state
    dicts (CPU tensors) and the last epoch's train and eval figures."""
    history = train_state.get("history") or []
    out: dict[str, Any] = {"epoch": int(train_state.get("epoch", 0)),
                           "step": int(train_state.get("step", 0)),
                           "model_state_dict": {k: v.detach().cpu().clone()
                                                for k, v in model.items()}}
    if state.get("optimizer") is not None:
        out["optimizer_state_dict"] = state["optimizer"]
    if state.get("scheduler") is not None:
        out["scheduler_state_dict"] = state["scheduler"]
    for k, v in (history[-1] if history else {}).items():
        if (k.startswith("train_") or k.startswith("eval_")) and isinstance(v, (int, float)):
            out[k] = float(v)
    return out
