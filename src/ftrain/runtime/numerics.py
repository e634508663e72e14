"""The numeric environment: what decides the bits a training step computes, besides the code
and the data.

Resume is bitwise only on the same hardware and software. The same step on another CPU's
vector width (AVX2 against AVX-512 kernels), another intra-op thread count, another GPU model
or another CUDA/cuDNN build sums floating-point numbers in another order, and the last bits
differ. Every checkpoint records this environment; a resume under a different one continues
(it is correct training) and says, once, that the run is no longer bitwise equal to an
uninterrupted one.

Measured on a 2-core AVX-512 machine, torch 2.14.1 (docs/design/exact-resume.md): the same 5
steps of a small MLP give other bits with 1 and with 2 intra-op threads, and with
``ATEN_CPU_CAPABILITY`` avx512, avx2 or default; none of ``ATEN_CPU_CAPABILITY=avx2``,
``MKL_CBWR=AVX2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` reproduced an AVX2 CPU's bits.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# Compared only on the device type it matters for: a GPU's kernels do not use the CPU's
# vector units or its intra-op threads.
CPU_ONLY = ("cpu_capability", "intra_op_threads")
CUDA_ONLY = ("gpu", "compute_capability", "cuda", "cudnn")


def numeric_environment(device: torch.device) -> dict[str, Any]:
    """This process's numeric environment, as JSON values."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "device_type": device.type,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env.update(gpu=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def differences(before: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """What changed from ``before`` (a checkpoint's record; None for checkpoints written before
    it was recorded) to ``now``, as "name old -> new" texts; only the keys that matter on this
    device type."""
    if not before:
        return []
    device = now.get("device_type")
    out = []
    for key, value in now.items():
        if key in CPU_ONLY and device != "cpu" or key in CUDA_ONLY and device != "cuda":
            continue
        old = before.get(key)
        if key in before and old != value:
            out.append(f"{key} {old} -> {value}")
    return out


def compile_cache_per_capability() -> None:
    """--compile on the CPU: keep torch.compile's on-disk cache apart for each ATen vector
    width. Inductor's cache keys leave ATen's capability out, so code compiled under one
    (``ATEN_CPU_CAPABILITY=avx2``) and reused under another (AVX-512, the default here)
    computes wrong results without an error: measured with torch 2.14 on an AVX-512 machine, a
    16-32-4 MLP 0.56 off eager, NaN losses or a crash (``free(): invalid pointer``) in
    training. Each capability gets its own folder below inductor's default one
    (``/tmp/torchinductor_$USER/aten-avx512``); a TORCHINDUCTOR_CACHE_DIR the user set is kept
    as it is. (torch itself puts its default into the variable once it has used the cache:
    that one is not the user's.)"""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch's layout: its cache as it is
        return
    default = os.path.abspath(default_cache_dir())
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and os.path.abspath(current) != default:
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"aten-{capability}")
