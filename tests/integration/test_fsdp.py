"""``--parallel fsdp``: FSDP2 training with sharded checkpoints that keep every promise.

On several spawned ranks: the meta-device initialisation is the same on every world size, and
the ranks persist the same saves and never wait for storage. End to end (torchrun, 2 CPU
workers, gloo): a run SIGTERMed (emergency sharded checkpoint, exit 143) resumes bitwise equal
to an uninterrupted one; on S3, a run cut at a step does too; a corrupt or missing shard
invalidates its checkpoint as a whole; a ddp checkpoint resumes under fsdp and the other way
round; the tools read sharded checkpoints. With 4 workers, for the default CNN and the language
model of examples/charlm.py (a user's task; ``pytest -m extended``): SIGKILLed mid-epoch and
rerun on 4, bitwise equal to an uninterrupted run; resumed on 2 (the CNN then on 1), every
sample once; exported and predicted in one process. (SIGKILLs inside saves and during evaluation:
tests/system/test_chaos.py's fsdp run, against the same reference. Each rank's peak RSS in a
save and a resume: tests/system/test_memory.py. The sharded storage layer in-process:
tests/unit/test_fsdp.py.)
"""
from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import signal
import uuid
from pathlib import Path

import pytest
import torch

from ftrain.checkpoint import CheckpointStore, load_uri, step_dirname
from ftrain.config import load_config
from tests.harness.checkpoints import (
    assert_bitwise_equal,
    committed_steps,
    latest_committed,
    strip_timing,
)
from tests.harness.processes import (
    FSDP_CHAOS_EXTRA,
    SMALL,
    ckpt,
    rank_then_exit_now,
    run_train,
    wait_for,
)

FSDP = ["--parallel", "fsdp"]
# 2 epochs of 32 steps, a step checkpoint every 5 steps.
CNN = [*SMALL, *FSDP, "--save-every-steps", "5"]
MLP = [*CNN, "--model", "mlp"]


# ---------------------------------------------------------------------------- several ranks
def _init_on_ranks(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from ftrain.runtime.distributed import DistInfo
    from ftrain.runtime.fsdp import build_model
    from ftrain.tasks import ImageClassification

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    model = build_model(ImageClassification(), 7, DistInfo(rank, world, rank,
                                                           torch.device("cpu"), "gloo"))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()
            if hasattr(v, "full_tensor")}
    shapes = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()
              if hasattr(v, "to_local")}
    if rank == 0:
        torch.save((full, shapes), out)
    dist.destroy_process_group()


def test_initialisation_is_the_same_on_every_world_size(tmp_path):
    from ftrain.runtime.distributed import DistInfo
    from ftrain.runtime.fsdp import build_model
    from ftrain.tasks import ImageClassification

    plain = build_model(ImageClassification(), 7, DistInfo(0, 1, 0, torch.device("cpu"), None))
    assert not any(hasattr(v, "full_tensor") for v in plain.state_dict().values())
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "rank0.pt"
    procs = [ctx.Process(target=rank_then_exit_now,
                         args=(_init_on_ranks, r, 3, str(tmp_path / "store"), str(out)))
             for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    full, shapes = torch.load(out, weights_only=True)
    want = plain.state_dict()
    assert_bitwise_equal({k: want[k] for k in full}, full)
    # Sharded for real: rank 0 holds a third of the first conv's 32 output channels (11).
    assert shapes["features.0.weight"] == (11, 1, 3, 3)
    # Not the ddp init (one seed for the whole model), but a real one.
    assert 0.05 < float(want["features.0.weight"].std()) < 0.5
    assert torch.equal(want["features.1.weight"], torch.ones(32))


def _persist_on_ranks(rank: int, folder: str, store: str, out: str) -> None:
    import os
    import time

    import torch.distributed as dist

    from ftrain.checkpoint import ShardedCheckpointer
    from tests.harness.stores import HeldStorage

    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    group = dist.new_group(backend="gloo")
    # Rank 0's commit takes 0.8 s.
    saver = ShardedCheckpointer(CheckpointStore(HeldStorage(folder, pause=0.8)), keep_last=10,
                                orphan_grace_s=3600, group=group, is_main=rank == 0,
                                world_size=2)
    weight = torch.zeros(1000)

    def save(step: int, **kw):
        weight.fill_(step * 10 + rank)  # each rank's own tensor, named by its rank
        t0 = time.perf_counter()
        result = saver.save(step, {"sharded": {"model": {f"w{rank}": weight}}, "small": {}},
                            {"epoch": 0, "step": step}, {"epoch": 0}, **kw)
        return result, time.perf_counter() - t0

    stalls = [save(1)[1]]
    time.sleep(0.2)  # its persist has started (and waits in rank 0's commit)
    stalls += [save(step)[1] for step in (2, 3)]
    if rank == 0:
        # Rank 0's loop reaches save 4 only after save 1 committed: its persister takes 3
        # while rank 1's takes 4; rank 0 must drop 3 and persist 4 with rank 1.
        while not os.path.exists(os.path.join(folder, step_dirname(1), "manifest.json")):
            time.sleep(0.02)
        time.sleep(0.5)
    stalls.append(save(4)[1])
    ok = saver.wait()
    save(5)
    time.sleep(0.2)
    result, waited = save(6, blocking=True)
    saver.close()
    torch.save({"stalls": stalls, "ok": ok, "dropped": saver.dropped, "blocking": result,
                "waited": waited}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ranks_persist_the_same_saves_and_never_wait(tmp_path):
    """Saves due while one persists never make a rank's loop wait, and all ranks persist the
    same snapshots, even when one rank's loop is behind the other's."""
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "result"
    procs = [ctx.Process(target=rank_then_exit_now,
                         args=(_persist_on_ranks, r, str(tmp_path / "ckpt"),
                               str(tmp_path / "store"), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r in results:
        assert max(r["stalls"]) < 0.4, r["stalls"]  # none waited for the 0.8 s persist
        assert r["ok"] is True and r["blocking"] is True and r["waited"] > 0.8
        assert r["dropped"] == 2  # steps 2 and 3, on both ranks
    assert committed_steps(tmp_path / "ckpt") == [1, 4, 5, 6]
    for step in (1, 4, 5, 6):
        state = load_uri(str(tmp_path / "ckpt" / step_dirname(step))).model_state()
        assert set(state) == {"w0", "w1"}
        assert torch.all(state["w0"] == step * 10) and torch.all(state["w1"] == step * 10 + 1)


# ---------------------------------------------------------------------------- end to end
def _check_same_run(ref: Path, got: Path | str) -> None:
    a, b = load_uri(str(ref)), load_uri(str(got))
    assert a.sharded and b.sharded
    assert a.manifest.step == b.manifest.step
    assert_bitwise_equal(a.model_state(), b.model_state())
    assert strip_timing(a.train_state["history"]) == strip_timing(b.train_state["history"])


@pytest.fixture(scope="module")
def cnn_ref(tmp_path_factory) -> Path:
    """One uninterrupted fsdp run of the default job (a BatchNorm CNN) on 2 workers: the same
    run as CNN's flags, run by launch.chaos's reference runner so that tests/system/test_chaos.py's
    fsdp chaos run reuses it (FSDP_CHAOS_EXTRA)."""
    from tests.harness import chaos

    args = chaos.effective_train_args([*FSDP, *FSDP_CHAOS_EXTRA], kills=4)
    assert load_config(args, {}) == load_config(CNN, {})  # the same run
    ref = chaos.shared_reference(tmp_path_factory, 2, args)
    return ref.ckpt_dir


@pytest.mark.slow
def test_sigterm_writes_an_emergency_sharded_checkpoint(cnn_ref, tmp_path):
    from tests.harness.processes import kill_leftovers, launch_run_cmd, start_logged
    from tests.harness.traces import last_step, read_trace

    d, trace = tmp_path / "ckpt", tmp_path / "trace1"
    args = [*CNN, "--checkpoint-dir", str(d)]
    log = tmp_path / "run1.log"
    proc = start_logged(launch_run_cmd([*args, "--trace-samples", str(trace)], nproc=2), log)
    try:
        assert wait_for(lambda: len(read_trace(trace)) >= 2 * 8, timeout=180), log.read_text()
        proc.send_signal(signal.SIGTERM)  # to the container entrypoint, as Kubernetes does
        code = proc.wait(timeout=180)
    finally:
        kill_leftovers(str(tmp_path))
    text = log.read_text()
    assert code == 143 and "rank 0: 143, rank 1: 143" in text, text[-3000:]
    stopped_at = last_step(read_trace(trace))
    assert stopped_at < 64
    assert committed_steps(d)[-1] == stopped_at, text[-3000:]
    assert load_uri(str(d)).manifest.reason == "preempt"
    r = run_train(args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {d}/{step_dirname(stopped_at)}" in r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    _check_same_run(cnn_ref, d)
    manifest = load_uri(str(d)).manifest
    assert (manifest.format_version, manifest.layout) == (3, "sharded")
    assert manifest.shard_world_size == 2 and len(manifest.shards) == 2


# 4 ranks: 2 epochs of 8 steps of 64 items, a step checkpoint every 3 steps; the language
# model as small as it gets (512 windows of 16 characters, 1 layer of width 32).
TAIL = ["--batch-size", "64", "--epochs", "2", "--log-every-steps", "0", "--save-every-seconds",
        "0", *FSDP, "--save-every-steps", "3"]
TINY_LM = {"context": 16, "d_model": 32, "layers": 1, "heads": 2, "max_train_chars": 8193,
           "max_eval_chars": 2049}
FOUR_RANKS = {
    "cnn": ["--synthetic-train-size", "512", "--synthetic-test-size", "256", *TAIL],
    "lm": ["--task", "examples.charlm:CharLM", "--task-args", json.dumps(TINY_LM), "--lr",
           "0.02", "--optimizer", "adamw", *TAIL],
}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # export, predict: no group
# The language model (a user's task) is the second case: `pytest -m extended`, run by CI.
@pytest.mark.parametrize("job", ["cnn", pytest.param("lm", marks=pytest.mark.extended)])
def test_4_ranks_killed_resume_bitwise_on_4_once_on_2_export_predict(job, tmp_path, capsys):
    """Issue 11's test of done, for the default job (a BatchNorm CNN) and the language model:
    4 ranks SIGKILLed mid-epoch after a committed checkpoint. Rerun on 4, the run ends bitwise
    equal to an uninterrupted 4-rank run (weights, history, every step's samples). The same
    checkpoints resumed on 2 (and for the CNN then on 1) train every sample of each epoch
    once. The final checkpoint (4 shards) exports to a plain state_dict of the unsharded
    model, and predict runs from it in one CPU process."""
    import re

    from tests.harness import chaos, logs
    from tests.harness.traces import assert_epoch_exactly_once, read_trace

    args = FOUR_RANKS[job]
    ref = chaos.ensure_reference(tmp_path / "ref", 4, args)
    d, d2 = tmp_path / "ckpt", tmp_path / "ckpt2"
    killed = chaos.Job(4, args, d, tmp_path / "trace-killed", tmp_path / "killed.log").start()
    assert killed.wait_until(lambda: latest_committed(d) >= 3, 300), \
        killed.log_text()[-3000:]
    killed.kill(signal.SIGKILL, "launcher", random.Random(0))  # torchrun and every worker
    assert killed.wait(60) is not None and killed.reap(30) == 0
    at = latest_committed(d)
    assert at % 8, "the kill should land mid-epoch"
    shutil.copytree(d, d2)

    again = chaos.Job(4, args, d, tmp_path / "trace-again", tmp_path / "again.log")
    assert chaos.run_to_end(again, timeout=300) == 0, again.log_text()[-3000:]
    assert logs.resumed(again.log_text())["uri"] == f"{d}/{step_dirname(at)}"
    verdict = chaos.compare_runs(ref, d, [killed.trace_dir, again.trace_dir])
    assert not verdict["problems"], verdict

    # On 2 workers (the CNN: to step 12, in the second epoch, then on one process).
    chain = [(2, 12), (0, 0)] if job == "cnn" else [(2, 0)]
    traces = [[x for x in read_trace(killed.trace_dir) if x["step"] <= at]]
    before, starts = 4, [at]
    for i, (world, max_steps) in enumerate(chain):
        r = run_train([*args, "--checkpoint-dir", str(d2), "--max-steps", str(max_steps),
                       "--trace-samples", str(tmp_path / f"trace{i}")], nproc=world)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed from {d2}/{step_dirname(starts[-1])}" in r.stderr, r.stderr[-3000:]
        assert f"allowed change: world size {before} -> {max(world, 1)}" in r.stderr
        traces.append(read_trace(tmp_path / f"trace{i}"))
        assert {x["world"] for x in traces[-1]} == {max(world, 1)}
        before = max(world, 1)
        starts.append(max(x["step"] for x in traces[-1]))
    assert starts == ([at, 12, 16] if job == "cnn" else [at, 16])
    lines = [x for t in traces for x in t]
    for epoch in (0, 1):
        assert_epoch_exactly_once(lines, 512, 64, 0, epoch)
    final = load_uri(str(d2))
    assert final.manifest.shard_world_size == before
    assert [h["step"] for h in final.train_state["history"]] == [8, 16]

    # `ckpt export` and `predict` (their main(), in this one CPU process without a process
    # group), from the 4 shards of the run resumed on 4.
    from ftrain import ckpt as ckpt_tool
    from ftrain import predict

    loaded = load_uri(str(d))
    assert loaded.manifest.shard_world_size == 4 and len(loaded.manifest.shards) == 4
    assert ckpt_tool.main(["export", str(d), str(tmp_path / "model.pth")]) == 0
    weights = torch.load(tmp_path / "model.pth", weights_only=True)
    if job == "cnn":
        from ftrain.tasks.builtin.models import build_model

        model = build_model(loaded.manifest.model_args)
    else:
        from examples.charlm import CharLM

        model = CharLM(**TINY_LM).build_model()
    model.load_state_dict(weights)  # a plain state_dict of the unsharded model
    assert_bitwise_equal(weights, loaded.model_state())
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(d), "--show", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # The metric of the run's own evaluation of these weights (summed in another order).
    name, items = ("acc", 256) if job == "cnn" else ("bpc", 128)
    got = re.search(rf" {name} ([0-9.]+) over {items} test items", out)
    assert got, out
    want = loaded.train_state["history"][-1][f"eval_{name}"]
    assert float(got.group(1)) == pytest.approx(want, abs=1e-4), out


@pytest.mark.slow
def test_uneven_eval_shards_do_not_hang(tmp_path):
    """513 eval items on 2 ranks, batches of 256: rank 0 has 2 batches, rank 1 one. Every FSDP
    forward is collective, so rank 1 runs a discarded one more (no hang until the timeout);
    the evaluation still counts each item once."""
    r = run_train([*MLP, "--synthetic-test-size", "513", "--epochs", "1", "--dist-timeout",
                   "60", "--checkpoint-dir", str(tmp_path / "ckpt")], nproc=2, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1/1 done" in r.stderr
    history = load_uri(str(tmp_path / "ckpt")).train_state["history"]
    assert 0 < history[0]["eval_acc"] <= 1 and round(history[0]["eval_acc"] * 513, 6) % 1 == 0


def _damage(folder: Path, step: int, how: str) -> str:
    manifest = json.loads((folder / step_dirname(step) / "manifest.json").read_text())
    shard = sorted(manifest["shards"])[-1]
    path = folder / step_dirname(step) / shard
    if how == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    else:
        path.unlink()
    return shard


@pytest.mark.slow
def test_a_corrupt_or_missing_shard_invalidates_the_whole_checkpoint(cnn_ref, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(cnn_ref, d)
    assert committed_steps(d) == [55, 60, 64]
    corrupt = _damage(d, 64, "corrupt")
    missing = _damage(d, 60, "delete")
    r = ckpt("verify", str(d))
    assert r.returncode == 1
    assert f"{corrupt} fails its XXH3-128 check" in r.stdout, r.stdout
    assert f"{missing} is missing" in r.stdout, r.stdout
    r = run_train([*CNN, "--checkpoint-dir", str(d), "--epochs", "3", "--max-steps", "57"],
                  nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"SKIPPING checkpoint {d}/{step_dirname(64)}: {corrupt} fails its XXH3-128 check" \
        in r.stderr, r.stderr[-3000:]
    assert f"SKIPPING checkpoint {d}/{step_dirname(60)}: {missing} is missing" in r.stderr
    assert f"resumed from {d}/{step_dirname(55)}" in r.stderr


@pytest.mark.slow
def test_switching_between_ddp_and_fsdp_converts_the_checkpoint(tmp_path):
    """A ddp checkpoint resumes under fsdp (its whole tensors sliced into shards, the optimizer
    state re-keyed by parameter name) and an fsdp one under ddp (its shards assembled). On 2
    ranks both reductions add the same two gradients (a + b == b + a) and divide by 2, so each
    switched run ends bitwise equal to an uninterrupted run of the --parallel it started with:
    nothing was lost or mixed up in the conversion."""
    args = [*SMALL, "--model", "mlp", "--optimizer", "adamw", "--lr", "0.003",
            "--save-every-steps", "10", "--epochs", "1"]  # 32 steps, cut at 21
    runs = {"ddp": [], "fsdp": [*FSDP], "ddp-then-fsdp": [], "fsdp-then-ddp": [*FSDP]}
    for name, first in runs.items():
        r = run_train([*args, *first, "--checkpoint-dir", str(tmp_path / name),
                       *(["--max-steps", "21"] if "-then-" in name else [])], nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
    for name, then in (("ddp-then-fsdp", FSDP), ("fsdp-then-ddp", [])):
        r = run_train([*args, *then, "--checkpoint-dir", str(tmp_path / name)], nproc=2)
        assert r.returncode == 0, r.stderr[-3000:]
        before, after = ("ddp", "fsdp") if then else ("fsdp", "ddp")
        assert f"applying --parallel '{before}' -> '{after}'" in r.stderr, r.stderr[-3000:]
        assert f"resumed from {tmp_path / name}/{step_dirname(21)}" in r.stderr
        assert load_uri(str(tmp_path / name)).sharded == (after == "fsdp")
        want = load_uri(str(tmp_path / before))
        got = load_uri(str(tmp_path / name))
        assert_bitwise_equal(want.model_state(), got.model_state())
        assert strip_timing(want.train_state["history"]) == \
            strip_timing(got.train_state["history"])


@pytest.mark.slow
def test_tools_read_sharded_checkpoints(cnn_ref, tmp_path):
    r = ckpt("verify", str(cnn_ref))
    assert r.returncode == 0 and "3 valid, 0 invalid" in r.stdout, r.stdout + r.stderr
    r = ckpt("ls", str(cnn_ref))
    assert r.returncode == 0 and r.stdout.count("valid") == 3, r.stdout
    info = json.loads(ckpt("inspect", str(cnn_ref), "--json").stdout)
    assert (info["layout"], info["shards"], info["step"]) == ("sharded", 2, 64)
    r = ckpt("inspect", str(cnn_ref))
    assert "layout       sharded" in r.stdout and "parameters (rebuilt" in r.stdout, r.stdout
    # export and predict: test_4_ranks_killed_resume_bitwise_on_4_once_on_2_export_predict


@pytest.mark.slow
def test_s3_same_code_path_cut_and_resumed_exactly(s3, fault_proxy, cnn_ref, tmp_path):
    """The resume goes through the (fault-free) proxy, which counts its requests: each rank
    downloads its shard file once, to verify it, and the load takes those bytes."""
    uri = s3.uri(f"fsdp-{uuid.uuid4().hex[:8]}")
    r = run_train([*CNN, "--max-steps", "23", "--checkpoint-dir", uri], nproc=2, env=s3.env,
                  timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    prefix = f"{uri.rsplit('/', 1)[1]}/{step_dirname(23)}"
    sizes = {name: meta["size"] for name, meta in
             json.loads(s3.read(f"{prefix}/manifest.json"))["files"].items()}
    r = run_train([*CNN, "--checkpoint-dir", uri], nproc=2, timeout=400,
                  env={**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url})
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {uri}/{step_dirname(23)}" in r.stderr
    gets = [(q.target.split("?")[0].rsplit("/", 1)[1], q.range) for q in fault_proxy.requests
            if q.method == "GET" and f"/{prefix}/shard-" in q.target]
    whole = sorted(name for name, ranged in gets if not ranged)
    assert len(whole) == 2 and len(set(whole)) == 2, gets  # each rank its own, once
    # Rank 1 also needs the values rank 0 wrote for both (optimizer hyperparameters, BatchNorm's
    # batch counts): a ranged read of those bytes alone, not the whole file again.
    for name, ranged in gets:
        if ranged:
            first, last = map(int, ranged.removeprefix("bytes=").split("-"))
            assert last - first + 1 < sizes[name] / 10, (gets, sizes)
    keys = s3.keys(uri.rsplit("/", 1)[1] + "/" + step_dirname(64))
    assert sum(k.endswith(".distcp") for k in keys) == 2
    assert any(k.endswith("manifest.json") for k in keys)
    _check_same_run(cnn_ref, uri)
