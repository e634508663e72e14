"""ftrain.fit as a library call: it returns a result, raises typed errors, leaves the caller's
signal handlers, logging and deterministic mode as they were, and can be called again in the
same process; ftrain.load_model gives back a checkpoint's model."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness.processes import PY, ROOT, base_env

pytestmark = pytest.mark.slow

SCRIPT = r'''
import json, logging, signal, sys
import torch
import ftrain
from tests.harness.tasks import SignalTask

ckpt = sys.argv[1]
cfg = {"epochs": 2, "batch_size": 16, "checkpoint_dir": ckpt, "log_every_steps": 0,
       "save_every_seconds": 0, "storage_options": {"auto_mkdir": True}}
mine = logging.StreamHandler(sys.stdout)
logging.getLogger().addHandler(mine)
logging.getLogger().setLevel(logging.ERROR)
before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
          list(logging.getLogger().handlers), logging.getLogger().level,
          torch.are_deterministic_algorithms_enabled())

def same():
    now = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
           list(logging.getLogger().handlers), logging.getLogger().level,
           torch.are_deterministic_algorithms_enabled())
    return now == before

out = {}
# Ctrl-C at step 5: the emergency checkpoint, then a KeyboardInterrupt.
SignalTask.signum, SignalTask.at = signal.SIGINT, 5
try:
    ftrain.fit(SignalTask, dict(cfg, deterministic=True))
except KeyboardInterrupt as e:
    out["interrupted"] = [type(e).__name__, e.step, e.saved, e.checkpoint, e.exit_code]
out["restored_after_interrupt"] = same()
# SIGTERM at step 6 of the next call: Preempted, after the emergency checkpoint.
SignalTask.signum, SignalTask.at = signal.SIGTERM, 1
try:
    ftrain.fit(SignalTask, cfg)
except ftrain.Preempted as e:
    out["preempted"] = [e.step, e.saved, e.checkpoint, e.exit_code]
out["restored_after_preempt"] = same()
# The same task to the end: a result.
SignalTask.at = 0
result = ftrain.fit(SignalTask, cfg)
out["result"] = [result.step, result.epoch, len(result.history), result.checkpoint]
out["restored_after_result"] = same()
# Bad input raises, and leaves nothing behind either.
try:
    ftrain.fit(SignalTask, dict(cfg, epochs=0, grad_accum=3))
except ftrain.ConfigError as e:
    out["config_error"] = [isinstance(e, ftrain.InputError), len(e.problems)]
out["restored_after_error"] = same()
model = ftrain.load_model(ckpt)
out["model"] = [type(model).__name__, model.training]
try:
    ftrain.load_model(ckpt + "/nothing-here")
except ftrain.InputError as e:
    out["load_error"] = str(e)[:200]
print("RESULT " + json.dumps(out))
'''


def test_fit_twice_in_one_process_and_the_caller_keeps_its_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    r = subprocess.run([PY, "-c", SCRIPT, str(ckpt)], cwd=ROOT, env=base_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    out = json.loads(next(line for line in r.stdout.splitlines()
                          if line.startswith("RESULT "))[7:])
    step5 = str(ckpt / "step_0000000005")
    # 64 items, batch 16: 4 steps an epoch. Ctrl-C lands after step 5, mid-epoch 2.
    assert out["interrupted"] == ["Interrupted", 5, True, step5, 130]
    # The next call resumes at step 5; its SIGTERM lands after its first step.
    assert out["preempted"] == [6, True, str(ckpt / "step_0000000006"), 143]
    assert out["result"] == [8, 2, 2, str(ckpt / "step_0000000008")]
    assert out["config_error"] == [True, 2]
    assert all(out[k] for k in ("restored_after_interrupt", "restored_after_preempt",
                                "restored_after_result", "restored_after_error"))
    assert out["model"] == ["Sequential", False]
    assert "no valid checkpoint" in out["load_error"] or "nothing-here" in out["load_error"]
