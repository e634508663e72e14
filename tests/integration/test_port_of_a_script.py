"""examples/port_of_a_script.py trains as its plain original does: the same eval accuracy
within noise, on the same generated data (docs/guide/porting-a-script.md). Without its two
declarations the same lines train something else."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness.checkpoints import latest
from tests.harness.processes import PY, ROOT, base_env, run_train

pytestmark = pytest.mark.slow

PORT = ["--batch-size", "64", "--epochs", "3", "--lr", "1.0", "--log-every-steps", "0",
        "--save-every-seconds", "0"]


def test_the_port_reaches_the_plain_scripts_accuracy(tmp_path):
    r = subprocess.run([PY, "examples/plain_script.py", "--epochs", "3", "--log-interval",
                        "1000"], cwd=ROOT, env=base_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = float(r.stdout.strip().splitlines()[-1].rsplit("(", 1)[1].rstrip(")"))
    r = run_train(["--task", "examples.port_of_a_script:MnistLike", *PORT,
                   "--checkpoint-dir", str(tmp_path / "port")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    port = latest(tmp_path / "port").train_state["history"][-1]["eval_acc"]
    print(f"eval accuracy: plain script {plain:.3f}, port on 2 workers {port:.3f}")
    assert plain > 0.6 and abs(port - plain) < 0.06, (plain, port)
    # Without loss_reduction = "mean" and scheduler_interval = "epoch": far below.
    r = run_train(["--task", "tests.harness.ported:NaivePort", *PORT,
                   "--checkpoint-dir", str(tmp_path / "naive")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    naive = latest(tmp_path / "naive").train_state["history"][-1]["eval_acc"]
    print(f"the same lines without the two declarations: {naive:.3f}")
    assert naive < plain - 0.15, (plain, naive)
