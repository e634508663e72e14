"""The numeric environment: what every checkpoint records of it, and which differences count on
which device type (a resume under another one, for real: tests/integration/test_numerics.py)."""

from __future__ import annotations

import json

import torch

from ftrain.runtime.numerics import differences, numeric_environment


def test_environment_names_what_decides_the_bits():
    env = numeric_environment(torch.device("cpu"))
    assert env["torch"] == torch.__version__ and env["device_type"] == "cpu"
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["intra_op_threads"] == torch.get_num_threads()
    assert env["deterministic"] is torch.are_deterministic_algorithms_enabled()
    json.dumps(env)  # recorded in the manifest and the train state


def test_differences_compare_what_matters_on_the_device_type():
    cpu = {"torch": "2.14.1", "device_type": "cpu", "deterministic": False,
           "cpu_capability": "AVX2", "intra_op_threads": 2}
    assert differences(cpu, dict(cpu)) == []
    assert differences(None, cpu) == []  # a checkpoint from before the record
    assert differences(cpu, dict(cpu, cpu_capability="AVX512", intra_op_threads=1)) == [
        "cpu_capability AVX2 -> AVX512", "intra_op_threads 2 -> 1"]
    gpu = dict(cpu, device_type="cuda", gpu="NVIDIA H100", compute_capability="9.0",
               cuda="12.8", cudnn=91000)
    # A GPU's kernels do not use the host's vector width or its intra-op threads.
    assert differences(gpu, dict(gpu, cpu_capability="AVX512", intra_op_threads=8)) == []
    assert differences(gpu, dict(gpu, gpu="NVIDIA H200", cudnn=91002)) == [
        "gpu NVIDIA H100 -> NVIDIA H200", "cudnn 91000 -> 91002"]
    assert differences(gpu, cpu) == ["device_type cuda -> cpu"]
