"""A resume under another numeric environment, for real: it goes on, says once that the run is
no longer bitwise equal to an uninterrupted one, and records it in the history (the record and
its comparison in-process: tests/unit/test_numerics.py)."""

from __future__ import annotations

import pytest
import torch

from tests.harness.checkpoints import latest
from tests.harness.processes import SMALL, inspect, run_train

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


_COMPILED_VS_EAGER = """
import torch
from torch import nn
from torch._inductor.runtime.cache_dir_utils import cache_dir
from ftrain.runtime.numerics import compile_cache_per_capability
cache_dir()  # as in a training process: torch has put its default into the variable
compile_cache_per_capability()  # what --compile does on the CPU
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
x = torch.randn(32, 16)
print((m(x) - torch.compile(m)(x)).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.extended  # two cold inductor compiles (36 s); --compile's resume: test_porting.py
def test_compiled_code_is_not_shared_across_aten_vector_widths(tmp_path):
    """Inductor's on-disk cache keys leave ATen's capability out: code compiled under
    ATEN_CPU_CAPABILITY=avx2 and reused under AVX-512 (or the other way round) computed a
    wrong MLP (0.56 off on an AVX-512 machine, NaN or a crash in training). --compile keeps a
    cache folder for each capability: one default cache (TMPDIR here), a process under each
    capability, each compiled model equal to eager (with one cache for both, the second was
    0.563 off)."""
    import subprocess

    from tests.harness.processes import PY, base_env

    env = base_env({"TMPDIR": str(tmp_path)})
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    diffs = []
    for capability in (None, "avx2"):
        run_env = dict(env, **({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
        r = subprocess.run([PY, "-c", _COMPILED_VS_EAGER], env=run_env, text=True,
                           capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        diffs.append(float(r.stdout.split()[-1]))
    assert max(diffs) < 1e-5, diffs
    folders = {p.name for p in tmp_path.glob("torchinductor_*/aten-*")}
    native = torch.backends.cpu.get_cpu_capability().lower()
    assert folders == {f"aten-{native}", "aten-avx2"}, folders
