"""The task API: a user's task trained from the command line and from Python, the checkpoint
recording it, the tools rebuilding it, clear errors for a task that cannot be imported, a data
fingerprint that refuses changed data, --grad-accum and --clip-grad-norm resuming exactly, and
a package that installs ftrain and no top-level src."""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest

from ftrain.checkpoint import load_uri
from tests.harness.checkpoints import (
    assert_bitwise_equal,
    committed_steps,
    cut_and_resume,
    latest,
    strip_timing,
)
from tests.harness.processes import PY, ROOT, SMALL, base_env, ckpt, export_weights, run_train

TOY = ["--task", "tests.harness.tasks:ToyTask", "--batch-size", "16", "--epochs", "2",
       "--log-every-steps", "0", "--save-every-seconds", "0"]


def test_the_wheel_holds_ftrain_and_no_top_level_src(tmp_path):
    """What `pip install .` installs: the ftrain package, its metadata and console scripts;
    no top-level src (the shims in src/ are for checkouts only)."""
    r = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("ftrain-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = {n.split("/")[0] for n in names}
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert top == {"ftrain", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "ftrain/tasks/__init__.py" in names and "ftrain/checkpoint/store.py" in names and not any(n.startswith("src") for n in names)
    for script in ("ftrain-train = ftrain.train:cli", "ftrain-ckpt = ftrain.ckpt:cli",
                   "ftrain-predict = ftrain.predict:cli"):
        assert script in entry_points


@pytest.mark.slow
def test_unknown_task_exits_2_with_the_import_string(tmp_path):
    r = run_train(["--task", "nosuch.mod:Task", "--checkpoint-dir", str(tmp_path / "c")])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--task nosuch.mod:Task: cannot import module 'nosuch.mod'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_fit_from_python_then_tools_rebuild_the_task(tmp_path):
    d = tmp_path / "ckpt"
    code = ("import ftrain\nfrom tests.harness.tasks import ToyTask\n"
            f"result = ftrain.fit(ToyTask, {{'epochs': 2, 'batch_size': 16, "
            f"'checkpoint_dir': {str(d)!r}, 'log_every_steps': 0}})\n"
            "assert result.step == 8 and result.checkpoint.endswith('step_0000000008')")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, env=base_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert committed_steps(d)[-1] == 8  # 64 items / 16, 2 epochs
    loaded = latest(d)
    assert loaded.manifest.task == {"import": "tests.harness.tasks:ToyTask", "args": {}}
    assert [sorted(h) for h in loaded.train_state["history"]][0] == sorted(
        ["epoch", "step", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr",
         "samples_per_s", "seconds", "saves_dropped"])
    weights = export_weights(str(d), tmp_path / "w.pth")
    assert_bitwise_equal(weights, loaded.state["model"])
    out = ckpt("inspect", str(d))
    assert out.returncode == 0 and "task         tests.harness.tasks:ToyTask" in out.stdout
    assert "Sequential" in out.stdout
    # The same command again: complete, nothing to do.
    r = subprocess.run([PY, "-c", code], cwd=ROOT, env=base_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "training already complete" in r.stdout + r.stderr
    # A checkpoint whose task cannot be imported here: the tools say which and what to do.
    manifest = d / f"step_{8:010d}" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["task"]["import"] = "gone.module:ToyTask"
    manifest.write_text(json.dumps(m))
    out = ckpt("export", str(d / f"step_{8:010d}"), str(tmp_path / "x.pth"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--task gone.module:ToyTask: cannot import module 'gone.module'" in out.stderr


@pytest.mark.slow
def test_loader_workers_are_forked_once_when_training_starts(tmp_path):
    """With --num-workers the train and eval loaders fork their workers once, as fit() starts,
    before any checkpoint is persisted or any background collective runs: a fork copies the
    locks that other threads hold at that instant, and a worker forked mid-persist could
    inherit one held for ever. (Loaders built per epoch forked at every epoch start, while
    the epoch-end save was being written.)"""
    code = ("import os, ftrain\nfrom tests.harness.tasks import PidTask\nprint(os.getpid())\n"
            f"ftrain.fit(PidTask, {{'epochs': 2, 'batch_size': 16, 'num_workers': 1, "
            f"'data_on_device': 'off', 'data_dir': {str(tmp_path)!r}, "
            f"'checkpoint_dir': {str(tmp_path / 'ckpt')!r}, 'log_every_steps': 0, "
            "'save_every_seconds': 0})")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, env=base_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    trainer = int(r.stdout.split()[0])
    fetchers = (tmp_path / "pids").read_text().split()
    workers = set(map(int, fetchers)) - {trainer}  # the trainer itself: the data fingerprint
    assert len(workers) == 2, f"one train and one eval worker for the run, not {workers}"
    assert committed_steps(tmp_path / "ckpt") == [4, 8]


@pytest.mark.slow
def test_changed_data_under_the_same_task_is_refused(tmp_path):
    from tests.harness.tasks import write_data

    data, d = tmp_path / "data", tmp_path / "ckpt"
    write_data(data, 1)
    args = ["--task", "tests.harness.tasks:FileTask", "--data-dir", str(data), "--batch-size", "16",
            "--checkpoint-dir", str(d), "--log-every-steps", "0"]
    r = run_train([*args, "--max-steps", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    before = latest(d).train_state["run"]["data_train"]
    write_data(data, 2)
    r = run_train(args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"training data fingerprint: checkpoint 64 items, digest {before['digest']}, now 64 "
            "items, digest ") in r.stderr
    assert committed_steps(d) == [2]


@pytest.mark.slow
def test_grad_accum_and_clipping_resume_bitwise(tmp_path):
    """--grad-accum 4 --clip-grad-norm 0.5: cut at step 11 and resumed, the weights equal an
    uninterrupted run's bit for bit (2 workers)."""
    args = [*SMALL, "--grad-accum", "4", "--clip-grad-norm", "0.5"]
    loader = ("--data-on-device", "off", "--num-workers", "1")
    a, _b, _ = cut_and_resume(args, tmp_path, 11, ref_args=loader)
    cut = tmp_path / "cut"
    assert a.train_state["run"]["grad_accum"] == 4
    # Changing them on resume is applied, and the log says the run is no longer bitwise-equal.
    r = run_train([*args[:-4], "--grad-accum", "2", "--clip-grad-norm", "0.5", "--epochs", "3",
                   "--max-steps", "70", "--checkpoint-dir", str(cut)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume: applying --grad-accum 4 -> 2" in r.stderr
    assert "no longer bitwise-equal" in r.stderr


@pytest.mark.slow
def test_torchrun_world_size_one_equals_a_single_process(tmp_path):
    """Under torchrun at world size 1 the model is not wrapped in DDP (nothing to reduce) and
    the batches are gathered on the device: the weights equal a plain process's bit for bit,
    and equal those of the DataLoader path (--data-on-device off)."""
    args = [*SMALL, "--max-steps", "12"]
    runs = {"torchrun": (1, []), "process": (0, []), "loader": (0, ["--data-on-device", "off"])}
    for name, (nproc, extra) in runs.items():
        r = run_train([*args, *extra, "--checkpoint-dir", str(tmp_path / name)], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = (latest(tmp_path / name).state["model"] for name in runs)
    assert_bitwise_equal(a, b)
    assert_bitwise_equal(b, c)


@pytest.fixture(scope="module")
def fp32_weights(tmp_path_factory) -> dict:
    """The weights of the precision tests' run in fp32 (one process, 20 steps)."""
    d = tmp_path_factory.mktemp("fp32")
    r = run_train([*SMALL, "--max-steps", "20", "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-3000:]
    return latest(d).state["model"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_every_precision_resumes_bitwise(tmp_path, precision, fp32_weights):
    """Autocast in bf16 or fp16 (with its gradient scaler checkpointed) on CPU, 2 workers: cut
    at step 11 and resumed, the weights equal an uninterrupted run's bit for bit."""
    args = [*SMALL, "--precision", precision, "--max-steps", "20"]
    a, b, _ = cut_and_resume(args, tmp_path, 11)  # the later --max-steps wins for the cut
    assert a.train_state["step"] == b.train_state["step"] == 20
    if precision == "fp16":
        assert a.state["scaler"] == b.state["scaler"] and a.state["scaler"]["scale"] > 0
    else:
        assert "scaler" not in a.state
    # The fp32 run differs: the precision is really applied.
    assert not all(a.state["model"][k].equal(v) for k, v in fp32_weights.items())


@pytest.mark.slow
def test_dropout_resumes_bitwise_from_per_step_seeds(tmp_path):
    """Every rank's RNGs are seeded before every step from (seed, epoch, batch, rank), so a
    checkpoint carries no RNG state: any process derives it (a survivor checkpoints for a dead
    peer). With dropout in the model, a run cut at step 5 of 8 (epoch 1) and resumed ends
    bitwise equal; the loader path (batches gathered from tensors, or a DataLoader with a
    worker) does not touch the model's RNG."""
    args = ["--task", "tests.harness.tasks:DropoutTask", "--batch-size", "8", "--epochs", "2",
            "--log-every-steps", "0", "--save-every-seconds", "0"]
    loader = ("--data-on-device", "off", "--num-workers", "1")
    a, b, resumed = cut_and_resume(args, tmp_path, 5, ref_args=loader, resume_args=loader)
    assert "step 5, batch 5 of epoch 1" in resumed, resumed[-3000:]
    assert "rng" not in load_uri(str(tmp_path / "cut" / "step_0000000005")).state
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])
