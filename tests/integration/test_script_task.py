"""A task defined in the training script itself (``python my_script.py`` calling
``ftrain.fit(MyTask, ...)``): the checkpoints record the script's path, and the tools import
it from there; a script that would train again when imported is refused at once."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from tests.harness.checkpoints import committed_steps
from tests.harness.processes import PY, base_env, ckpt

pytestmark = pytest.mark.slow

TASK = """
import torch
from torch import nn
import ftrain


class ScriptTask(ftrain.Task):
    def build_model(self):
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def datasets(self, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        x = torch.randn(64, 8, generator=g)
        data = torch.utils.data.TensorDataset(x, x[:, :3].argmax(1))
        return data, data

    def loss(self, outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets, reduction="sum")
        return loss, {"loss": loss.detach()}
"""


def _run(script, cwd):
    return subprocess.run([PY, str(script)], cwd=cwd, env=base_env(), capture_output=True,
                          text=True, timeout=300)


def test_a_task_in_the_script_trains_and_the_tools_import_it_from_the_file(tmp_path):
    d = tmp_path / "ckpt"
    script = tmp_path / "my_script.py"
    script.write_text(TASK + textwrap.dedent(f"""
        if __name__ == "__main__":
            result = ftrain.fit(ScriptTask, {{"epochs": 2, "batch_size": 16,
                                             "checkpoint_dir": {str(d)!r},
                                             "log_every_steps": 0}})
            print("STEP", result.step)
        """))
    r = _run(script, tmp_path)
    assert r.returncode == 0 and "STEP 8" in r.stdout, r.stderr[-3000:]
    assert committed_steps(d)[-1] == 8
    out = ckpt("inspect", str(d))
    assert out.returncode == 0, out.stderr
    assert f"task         {script}:ScriptTask" in out.stdout and "Sequential" in out.stdout
    out = ckpt("export", str(d), str(tmp_path / "w.pth"))
    assert out.returncode == 0 and "STEP" not in out.stdout, out.stdout + out.stderr
    # The same script again: complete, nothing to do (its recorded task is this file's).
    r = _run(script, tmp_path)
    assert r.returncode == 0 and "training already complete" in r.stdout + r.stderr


def test_a_script_that_would_train_when_imported_is_refused_at_once(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(TASK + textwrap.dedent(f"""
        ftrain.fit(ScriptTask, {{"epochs": 1, "checkpoint_dir": {str(tmp_path / 'c')!r}}})
        """))
    r = _run(script, tmp_path)
    assert r.returncode != 0
    assert "calls fit() when it is imported" in r.stderr, r.stderr[-3000:]
    assert 'if __name__ == "__main__":' in r.stderr
    assert not (tmp_path / "c").exists()
