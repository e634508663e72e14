"""The two examples of examples/, trained as a user would: every guarantee proven on the
character-level language model as on the default job (SIGKILLs by launch.chaos -> bitwise-equal
weights and equal history; 4 -> 2 workers -> every sample exactly once; SIGTERM -> emergency
checkpoint, exit 143), and the image classifier trained, resumed, exported, predicted.

The language model is made tiny here (32 steps of 64 windows per epoch); its default size is
the run in docs/development/benchmarks-cpu.md.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import torch

from examples.charlm import unigram_bpc
from tests.harness import chaos
from tests.harness.checkpoints import committed_steps, cut_and_resume, latest, strip_timing
from tests.harness.processes import (
    PY,
    ROOT,
    base_env,
    export_weights,
    inspect,
    kill_leftovers,
    launch_run_cmd,
    run_train,
    start_logged,
    wait_for,
)
from tests.harness.traces import (
    assert_epoch_exactly_once,
    last_step,
    read_trace,
    steps_once_per_rank,
)

pytestmark = pytest.mark.slow

TINY_LM = {"context": 32, "d_model": 64, "layers": 1, "heads": 2, "max_train_chars": 65600,
           "max_eval_chars": 16400}
WINDOWS = (TINY_LM["max_train_chars"] - 1) // TINY_LM["context"]  # 2049 -> 32 batches of 64
LM = ["--task", "examples.charlm:CharLM", "--task-args", json.dumps(TINY_LM),
      "--batch-size", "64", "--epochs", "2", "--lr", "0.02", "--optimizer", "adamw",
      "--weight-decay", "0.01", "--log-every-steps", "0", "--save-every-seconds", "0"]
NPROC = 2
# What `launch.chaos --task examples.charlm:CharLM --task-args ... -- <LM's other flags>
# --save-every-steps 3` trains: its reference is lm_reference, run once for this module.
LM_CHAOS = chaos.effective_train_args([*LM, "--save-every-steps", "3"], kills=2)


@pytest.fixture(scope="module")
def lm_reference(tmp_path_factory) -> chaos.Reference:
    return chaos.ensure_reference(tmp_path_factory.mktemp("lm") / "reference", NPROC, LM_CHAOS)


def test_lm_learns_below_the_unigram_baseline(lm_reference):
    history = latest(lm_reference.ckpt_dir).train_state["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    baseline = unigram_bpc(TINY_LM["max_train_chars"], TINY_LM["max_eval_chars"])
    assert history[-1]["eval_bpc"] < baseline - 0.5, (history[-1], baseline)
    assert history[-1]["eval_bpc"] < history[0]["eval_bpc"]


def test_lm_four_to_two_workers_every_sample_once(tmp_path):
    d = tmp_path / "ckpt"
    traces = []
    for i, (world, max_steps) in enumerate([(4, 20), (2, 0)]):
        trace = tmp_path / f"trace{i}"
        r = run_train([*LM, "--checkpoint-dir", str(d), "--max-steps", str(max_steps),
                       "--trace-samples", str(trace)], nproc=world, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        traces.append(read_trace(trace))
    assert "resume: allowed change: world size 4 -> 2" in r.stderr
    first, second = traces
    assert max(x["step"] for x in first) == 20 and min(x["step"] for x in second) == 21
    assert max(x["step"] for x in second) == 64
    for epoch in (0, 1):
        assert_epoch_exactly_once(first + second, WINDOWS, 64, 0, epoch)
    assert [h["epoch"] for h in latest(d).train_state["history"]] == [1, 2]


@pytest.mark.extended  # a second case: docs/development/testing.md
def test_lm_sigterm_writes_an_emergency_checkpoint_and_exits_143(tmp_path):
    d, trace1 = tmp_path / "ckpt", tmp_path / "trace1"
    args = [*LM, "--epochs", "3", "--checkpoint-dir", str(d)]
    log = tmp_path / "run1.log"
    proc = start_logged(launch_run_cmd([*args, "--trace-samples", str(trace1)], nproc=2), log)
    try:
        assert wait_for(lambda: len(read_trace(trace1)) >= 6, timeout=180), log.read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 143, text[-3000:]
    first = read_trace(trace1)
    stopped_at = last_step(first)
    assert committed_steps(d)[-1] == stopped_at < 96
    r = run_train([*args, "--trace-samples", str(tmp_path / "trace2")], nproc=2, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    second = read_trace(tmp_path / "trace2")
    assert min(x["step"] for x in second) == stopped_at + 1
    for rank, steps in steps_once_per_rank(first + second).items():
        assert steps == list(range(1, 97)), f"rank {rank}: steps lost or repeated"


def test_chaos_sigkills_the_language_model(lm_reference, tmp_path):
    """SIGKILL to a worker and to torchrun with every worker, at moments drawn from the seed;
    each run resumed ends bitwise equal to the uninterrupted one (weights, history, the
    samples of every step). (SIGTERM: the test above, in make test-extended.)"""
    r = subprocess.run([PY, "-m", "launch.chaos", "--nproc", str(NPROC), "--kills", "2",
                        "--seed", "3", "--signals", "SIGKILL", "--workdir", str(tmp_path),
                        "--reference", lm_reference.folder, "--task", "examples.charlm:CharLM",
                        "--task-args", json.dumps(TINY_LM), "--", *LM[4:],
                        "--save-every-steps", "3"],
                       cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "examples.charlm:CharLM" in r.stdout  # the reference line names the training flags
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["result"] == "PASS", summary["problems"]
    # The module's reference, reused rather than run again.
    assert summary["train_args"] == LM_CHAOS
    assert summary["reference_wall_s"] == round(lm_reference.wall_s, 1)
    assert set(summary["kills_by_kind"]) == {"SIGKILL worker", "SIGKILL launcher"}
    assert summary["weights"].startswith("bitwise identical")
    assert summary["history"].startswith("identical")


# ---------------------------------------------------------------------------- image classifier
IMG = ["--task", "examples.image_classifier:SmallResNet", "--task-args",
       json.dumps({"width": 8, "train_size": 512, "test_size": 128}), "--batch-size", "64",
       "--epochs", "2", "--log-every-steps", "0", "--save-every-seconds", "0"]


def test_image_classifier_resumes_exports_and_predicts(tmp_path):
    a, b, _ = cut_and_resume(IMG, tmp_path, 11, ref_args=("--num-workers", "2"))
    cut = tmp_path / "cut"
    assert a.train_state["step"] == b.train_state["step"] == 16
    # The task's own state (an EMA of the weights) went through the checkpoints too.
    assert a.state["task"]["ema"] and torch.equal(a.state["task"]["ema"]["layers.8.weight"],
                                                  b.state["task"]["ema"]["layers.8.weight"])
    strip = strip_timing
    assert strip(a.train_state["history"]) == strip(b.train_state["history"])
    info = inspect(str(cut))
    assert info["task"] == {"import": "examples.image_classifier:SmallResNet",
                            "args": {"width": 8, "train_size": 512, "test_size": 128}}
    weights = export_weights(str(cut), tmp_path / "model.pth")
    from examples.image_classifier import SmallResNet

    model = SmallResNet(width=8).build_model()
    model.load_state_dict(weights)  # the export loads into the user's own model
    out = subprocess.run([PY, "-m", "src.predict", "--checkpoint", str(cut), "--limit", "40",
                          "--show", "2"], cwd=ROOT, env=base_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "accuracy on test" in out.stdout and "/40 = " in out.stdout
    assert out.stdout.count("predicted") == 2
