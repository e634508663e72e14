"""A script ported as it is written: a mean loss, an epoch schedule and ReduceLROnPlateau
train as the script means them, resume exactly, and a misspelt declaration is refused."""

from __future__ import annotations

import pytest
import torch

from tests.harness.checkpoints import assert_bitwise_equal, latest, strip_timing
from tests.harness.processes import ckpt, run_train

pytestmark = pytest.mark.slow

ARGS = ["--batch-size", "32", "--epochs", "3", "--log-every-steps", "0",
        "--save-every-seconds", "0", "--lr", "0.1"]


def _train(tmp_path, name, task, *extra, nproc=0):
    d = tmp_path / name
    r = run_train(["--task", f"tests.harness.ported:{task}", *ARGS, *extra,
                   "--checkpoint-dir", str(d)], nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return latest(d)


def test_a_mean_loss_gives_the_sum_contracts_gradients(tmp_path):
    """The same steps with the loss as a sum and as a mean: the same weights within float
    rounding, on one process, on 4 workers, and on 2 with --grad-accum 2."""
    for extra, nproc in (([], 0), ([], 4), (["--grad-accum", "2"], 2)):
        tag = f"{nproc}-{len(extra)}"
        a = _train(tmp_path, f"sum{tag}", "SumTask", *extra, nproc=nproc)
        b = _train(tmp_path, f"mean{tag}", "MeanTask", *extra, nproc=nproc)
        for k, v in a.state["model"].items():
            torch.testing.assert_close(b.state["model"][k], v, rtol=1e-5, atol=1e-6)
        assert [round(h["train_loss"], 4) for h in a.train_state["history"]] == \
            [round(h["train_loss"], 4) for h in b.train_state["history"]]


@pytest.mark.parametrize("task", ["EpochStepLR", "Plateau", "MeanTask"])
def test_epoch_schedules_step_once_per_epoch_and_resume_exactly(tmp_path, task):
    """Cut mid-epoch 2 (step 11 of 8 a epoch) and resumed: bitwise the uninterrupted run,
    its schedule stepped once per epoch (StepLR: 1.0, 0.7, 0.49)."""
    full = _train(tmp_path, "full", task)
    d = tmp_path / "cut"
    args = ["--task", f"tests.harness.ported:{task}", *ARGS, "--checkpoint-dir", str(d)]
    r = run_train([*args, "--max-steps", "11"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(args)
    assert r.returncode == 0 and "step 11, batch 3 of epoch 2" in r.stderr, r.stderr[-3000:]
    cut = latest(d)
    assert_bitwise_equal(full.state["model"], cut.state["model"])
    assert strip_timing(full.train_state["history"]) == strip_timing(cut.train_state["history"])
    lrs = [h["lr"] for h in full.train_state["history"]]
    if task == "EpochStepLR":
        assert lrs == pytest.approx([1.0, 0.7, 0.49])
    if task == "Plateau":
        # Epoch 2's eval loss improves by under the 5% threshold: halved once, after it.
        assert lrs == [1.0, 1.0, 0.5]
        assert full.state["scheduler"]["best"] < 1.4  # its state is checkpointed


@pytest.mark.parametrize("task,needle", [
    ("Misspelt", "Misspelt.scheduler_intervall (class attribute) is not a Task declaration or "
                 "hook: did you mean 'scheduler_interval'?"),
    ("LightningSpelling", "LightningSpelling.configure_optimizers (method) is another trainer's "
                          "hook and is never called here; write configure_optimizer instead"),
    ("PlateauEveryStep", "returns a ReduceLROnPlateau: declare scheduler_interval = 'epoch'"),
])
def test_a_declaration_that_would_do_nothing_is_refused(tmp_path, task, needle):
    r = run_train(["--task", f"tests.harness.ported:{task}", *ARGS,
                   "--checkpoint-dir", str(tmp_path / "c")])
    assert r.returncode == 2, r.stderr[-3000:]
    assert needle in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_names_of_your_own_stay_allowed(tmp_path):
    _train(tmp_path, "own", "OwnNames")


def test_your_optimizer_is_checked_on_resume_by_class_and_hyperparameters(tmp_path):
    """A task's own optimizer: --optimizer does not apply to it (changing it is no refusal);
    a hyperparameter changed in the code is refused, naming it, where loading the checkpoint
    would have put the old value back without a word."""
    d = tmp_path / "c"
    args = ["--task", "tests.harness.ported:CodeChanged", *ARGS, "--checkpoint-dir", str(d)]
    r = run_train([*args, "--max-steps", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--optimizer", "adamw", "--max-steps", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(args, env={"RHO": "0.95"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("the optimizer's param groups and hyperparameters (the task's own; the rates and "
            "momenta --lr, --momentum and --weight-decay scale excepted): group 0 rho 0.9 -> "
            "0.95") in r.stderr, r.stderr[-3000:]


def test_your_collate_fn_makes_the_batches_and_resume_stays_exact(tmp_path):
    """Variable-length sequences padded by the task's collate_fn, with a loader worker: a cut
    mid-epoch 2 resumes bitwise; the evaluation batch size (--eval-batch-size) changes the
    evaluation's batches, not its metrics."""
    args = ["--task", "tests.harness.ported:PaddedSequences", *ARGS, "--num-workers", "1"]
    full = tmp_path / "full"
    r = run_train([*args, "--checkpoint-dir", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    r = run_train([*args, "--max-steps", "11", "--checkpoint-dir", str(cut)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--eval-batch-size", "7", "--checkpoint-dir", str(cut)])
    assert r.returncode == 0 and "step 11, batch 3 of epoch 2" in r.stderr, r.stderr[-3000:]
    a, b = latest(full), latest(cut)
    assert_bitwise_equal(a.state["model"], b.state["model"])
    ha, hb = a.train_state["history"], b.train_state["history"]
    assert strip_timing(ha[:1]) == strip_timing(hb[:1])  # before --eval-batch-size 7
    for x, y in zip(ha[1:], hb[1:], strict=True):
        assert x["train_loss"] == y["train_loss"]
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-6)


@pytest.mark.extended  # the default suite's case: a survivor's cut inside an evaluation
def test_evaluations_inside_epochs_resume_exactly(tmp_path):
    """--eval-every-steps 3 on 2 workers (8 steps an epoch): evaluations at steps 3, 6, 9,
    ... (an epoch's last step evaluates anyway, into the history). Cut at step 10, between two
    of them, and resumed: the same weights, history and evaluations as uninterrupted."""
    args = ["--task", "tests.harness.ported:SumTask", *ARGS, "--eval-every-steps", "3"]
    r = run_train([*args, "--checkpoint-dir", str(tmp_path / "full")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    cut = tmp_path / "cut"
    r = run_train([*args, "--max-steps", "10", "--checkpoint-dir", str(cut)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--checkpoint-dir", str(cut)], nproc=2)
    assert r.returncode == 0 and "step 10, batch 2 of epoch 2" in r.stderr, r.stderr[-3000:]
    a, b = latest(tmp_path / "full"), latest(cut)
    assert_bitwise_equal(a.state["model"], b.state["model"])
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
    assert [e["step"] for e in a.train_state["evals"]] == [3, 6, 9, 12, 15, 18, 21]
    assert a.train_state["evals"] == b.train_state["evals"]
    assert all(0 <= e["eval_acc"] <= 1 for e in a.train_state["evals"])


def test_compile_resumes_exactly_and_swaps_checkpoints_with_a_plain_run(tmp_path):
    """--compile on the CPU: a compiled run cut at step 11 and resumed compiled ends bitwise
    equal to an uninterrupted compiled run; a plain run resumes a compiled run's checkpoint
    and the other way round (the keys are the model's own, never "_orig_mod."), and ckpt
    export loads into the plain model. The compilation is logged apart."""
    args = ["--task", "tests.harness.ported:SumTask", *ARGS, "--compile", "default"]
    r = run_train([*args, "--checkpoint-dir", str(tmp_path / "full")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled the model (--compile default): the first step took" in r.stderr
    cut = tmp_path / "cut"
    r = run_train([*args, "--max-steps", "11", "--checkpoint-dir", str(cut)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--checkpoint-dir", str(cut)], timeout=600)
    assert r.returncode == 0 and "step 11, batch 3 of epoch 2" in r.stderr, r.stderr[-3000:]
    a, b = latest(tmp_path / "full"), latest(cut)
    assert not any("_orig_mod" in k for k in a.state["model"])
    assert_bitwise_equal(a.state["model"], b.state["model"])
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
    # Swapped: a plain run continues the compiled run's checkpoint, a compiled one the plain.
    plain = ["--task", "tests.harness.ported:SumTask", *ARGS]
    swap = tmp_path / "swap"
    r = run_train([*plain, "--max-steps", "5", "--checkpoint-dir", str(swap)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*args, "--max-steps", "13", "--checkpoint-dir", str(swap)], timeout=600)
    assert r.returncode == 0 and "step 5, batch 5 of epoch 1" in r.stderr, r.stderr[-3000:]
    r = run_train([*plain, "--checkpoint-dir", str(swap)])
    assert r.returncode == 0 and "step 13, batch 5 of epoch 2" in r.stderr, r.stderr[-3000:]
    out = ckpt("export", str(swap), str(tmp_path / "w.pth"))
    assert out.returncode == 0, out.stdout + out.stderr
