"""The numeric environment: every checkpoint records it, and a resume under another one goes
on, says once that the run is no longer bitwise equal to an uninterrupted one, and records it
in the history."""

from __future__ import annotations

import json

import pytest
import torch

from ftrain.runtime.numerics import differences, numeric_environment
from tests.harness.checkpoints import latest
from tests.harness.processes import SMALL, inspect, run_train


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


ARGS = [*SMALL, "--model", "mlp", "--width", "16", "--depth", "1", "--synthetic-train-size",
        "512", "--synthetic-test-size", "128", "--epochs", "2"]


@pytest.mark.slow
def test_resume_on_another_numeric_environment_is_said_and_recorded(tmp_path):
    """A real change of environment, not a patched one: the resume runs 2 intra-op threads
    where the first run had 1, and on an AVX-512 machine ATen's AVX2 kernels
    (``ATEN_CPU_CAPABILITY=avx2``). (Not the scalar kernels, "default": they draw other
    random normals, so the synthetic data itself differs and the resume is refused on its
    fingerprint, as it should be.)"""
    ckpt = tmp_path / "ckpt"
    r = run_train([*ARGS, "--max-steps", "5", "--checkpoint-dir", str(ckpt)])
    assert r.returncode == 0, r.stderr[-3000:]
    first = inspect(str(ckpt))["numerics"]
    assert first["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert first["intra_op_threads"] == 1  # the tests run with OMP_NUM_THREADS=1

    env = {"OMP_NUM_THREADS": "2"}
    expected = ["intra_op_threads 1 -> 2"]
    if first["cpu_capability"] == "AVX512":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
        expected.insert(0, "cpu_capability AVX512 -> AVX2")
    r = run_train([*ARGS, "--checkpoint-dir", str(ckpt)], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "numeric environment changed" in line]
    assert len(said) == 1, r.stderr[-3000:]
    assert f"({', '.join(expected)})" in said[0], said[0]
    assert "from step 5 on" in said[0] and "no longer bitwise" in said[0]
    history = latest(ckpt).train_state["history"]
    assert history[0]["not_bitwise"] == [f"resumed at step 5: {x}" for x in expected]
    assert "not_bitwise" not in history[1]  # said once, in the epoch it happened
    assert inspect(str(ckpt))["numerics"]["intra_op_threads"] == 2

    # Resumed again under the same environment as the last checkpoint: nothing to say.
    r = run_train([*ARGS, "--epochs", "3", "--checkpoint-dir", str(ckpt)], env=env)
    assert r.returncode == 0 and "numeric environment changed" not in r.stderr, r.stderr[-3000:]
    assert "not_bitwise" not in latest(ckpt).train_state["history"][2]
