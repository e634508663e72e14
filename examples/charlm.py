"""A character-level transformer language model on the source of Python's standard library.

A user task written against ftrain's public API alone. The corpus is present offline on every
machine: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (without tests and
site-packages), split into train and eval by file (a file goes to eval when the CRC-32 of its
relative path is divisible by 10), read as bytes. Python versions ship different standard
libraries; the data fingerprint in every checkpoint refuses a resume on another one.

    torchrun --nproc_per_node=2 -m ftrain.train --config examples/charlm.yaml
    torchrun --nproc_per_node=2 -m ftrain.train --config examples/charlm.yaml --parallel fsdp
    python -m examples.charlm            # the unigram baseline, in bits per character

Loss: next-character cross-entropy; metric: bits per character (``bpc``).
"""

from __future__ import annotations

import math
import os
import sysconfig
import zlib
from functools import lru_cache

import torch
from torch import nn
from torch.utils.data import Dataset

from ftrain import Config, Task, TaskContext

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


@lru_cache(maxsize=4)
def corpus(split: str, max_chars: int) -> torch.Tensor:
    """The bytes of the split's files, in sorted path order, cut at ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    chunks, total = [], 0
    for path in sorted(paths):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if (zlib.crc32(rel.encode()) % 10 == 0) != (split == "eval"):
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    text = b"".join(chunks)[:max_chars]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).clone()


class Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` bytes: inputs are the first ``context``,
    targets the next character at every position."""

    rng_free = True  # drawing an item uses no randomness: ftrain need not seed the RNGs for it

    def __init__(self, data: torch.Tensor, context: int) -> None:
        self.data, self.context = data, context

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.context

    def __getitem__(self, i: int):
        chunk = self.data[i * self.context: (i + 1) * self.context + 1].long()
        return chunk[:-1], chunk[1:]


class CharTransformer(nn.Module):
    def __init__(self, context: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.empty(context, d_model))
        nn.init.normal_(self.pos, std=0.02)  # also here: --parallel ddp's init as it was
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def reset_parameters(self) -> None:
        """Set this module's own tensors again, not its children's (they have their own):
        ``--parallel fsdp`` builds the model on the meta device, where what ``__init__``
        computed is lost, and calls this on a copy of this module alone."""
        nn.init.normal_(self.pos, std=0.02)
        self.mask.copy_(nn.Transformer.generate_square_subsequent_mask(len(self.mask)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.embed(x) + self.pos[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


class CharLM(Task):
    """Next-character prediction; every argument is recorded in checkpoints."""

    def __init__(self, context: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4,
                 max_train_chars: int = 2_000_000, max_eval_chars: int = 200_000) -> None:
        self.context, self.d_model, self.layers, self.heads = context, d_model, layers, heads
        self.max_train_chars, self.max_eval_chars = max_train_chars, max_eval_chars

    def build_model(self) -> nn.Module:
        return CharTransformer(self.context, self.d_model, self.layers, self.heads)

    def datasets(self, ctx: TaskContext) -> tuple[Dataset, Dataset]:
        return (Windows(corpus("train", self.max_train_chars), self.context),
                Windows(corpus("eval", self.max_eval_chars), self.context))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor):
        nll = nn.functional.cross_entropy(outputs.reshape(-1, 256), targets.reshape(-1),
                                          reduction="sum")
        # Summed over the batch's windows: ftrain divides by the global batch (in windows).
        return nll, {"nll": nll.detach(), "chars": torch.tensor(float(targets.numel()))}

    def metrics(self, sums: dict[str, float], items: int) -> dict[str, float]:
        per_char = sums["nll"] / max(sums["chars"], 1.0)
        return {"loss": per_char, "bpc": per_char / math.log(2)}

    def configure_optimizer(self, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
        """AdamW; no weight decay on embeddings, norms and biases (two param groups)."""
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n
                 and n != "pos"]
        rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n
                                                               and n != "pos")]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=(cfg.momentum, 0.99))


def unigram_bpc(max_train_chars: int = 2_000_000, max_eval_chars: int = 200_000) -> float:
    """Bits per character of the eval split under the train split's character frequencies
    (add-one smoothed): the baseline a model must beat."""
    counts = torch.bincount(corpus("train", max_train_chars).long(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log2()
    ev = corpus("eval", max_eval_chars).long()
    return float(-logp[ev].mean())


if __name__ == "__main__":
    print(f"unigram baseline: {unigram_bpc():.3f} bits per character (eval split, train "
          "frequencies)")
