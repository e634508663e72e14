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


def match_inductor_to_aten() -> None:
    """--compile on the CPU: make torch.compile's generated code use ATen's vector width.
    With ATEN_CPU_CAPABILITY=avx2 (or default) on an AVX-512 machine, inductor still emits
    AVX-512 code and its compiled Linear layers compute wrong results (measured with torch
    2.14: 0.56 off for a 16-32-4 MLP, NaN losses in training); capping its SIMD width to
    ATen's makes them equal to eager again. A width the user set is kept."""
    import torch._inductor.config as inductor

    width = {"AVX2": 256, "DEFAULT": 1}.get(torch.backends.cpu.get_cpu_capability())
    if width is not None and inductor.cpp.simdlen is None:
        inductor.cpp.simdlen = width
