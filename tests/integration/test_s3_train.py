"""Full runs under torchrun with 2 workers against a real S3 endpoint (moto's server).

A run with ``--checkpoint-dir s3://...`` is SIGKILLed, all of it, once a checkpoint has
committed; the same command then finishes it, bitwise identical to an uninterrupted run (the
local-disk reference run that tests/integration/test_exact_resume.py and tests/system/test_chaos.py share).
A torchvision dataset given as ``--data-dir s3://...`` is fetched once per node.
"""

from __future__ import annotations

import signal
import struct
import uuid

import pytest
import torch

from ftrain.checkpoint import load_uri, step_dirname
from tests.harness import chaos
from tests.harness.checkpoints import assert_bitwise_equal, strip_timing
from tests.harness.processes import kill_all, processes_matching, run_train, start_train, wait_for

pytestmark = pytest.mark.slow

NPROC = 2
TRAIN_ARGS = chaos.effective_train_args([], kills=3)  # 2 epochs of 32 steps, a save every 3


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> chaos.Reference:
    return chaos.shared_reference(tmp_path_factory, NPROC, TRAIN_ARGS)


def test_s3_run_sigkilled_and_resumed_is_bitwise_identical(s3, reference, tmp_path):
    uri = s3.uri(f"killed-{uuid.uuid4().hex[:8]}")  # unique: it finds this job's processes
    args = [*TRAIN_ARGS, "--checkpoint-dir", uri]
    proc = start_train(args, nproc=NPROC, env=s3.env, log_path=tmp_path / "killed.log")
    try:
        assert wait_for(lambda: any(s >= 6 for s in s3.committed(uri.rsplit("/", 1)[1])),
                        timeout=240, interval=0.2), (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        # SIGKILL torchrun's process group and every worker (each has a session of its own):
        # a node dying. Nobody gets to write an emergency checkpoint.
        kill_all([proc.pid, *processes_matching(uri)], signal.SIGKILL)
        proc.wait()
    assert wait_for(lambda: not processes_matching(uri), timeout=60)
    before = s3.committed(uri.rsplit("/", 1)[1])
    assert before and max(before) < reference.total_steps, "finished before it was killed"
    assert "emergency" not in (tmp_path / "killed.log").read_text()

    r = run_train(args, nproc=NPROC, env=s3.env, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {uri}/{step_dirname(max(before))}" in r.stderr
    got, want = load_uri(uri), load_uri(str(reference.ckpt_dir))
    assert got.manifest.step == want.manifest.step == reference.total_steps
    assert_bitwise_equal(got.state["model"], want.state["model"])
    assert strip_timing(got.train_state["history"]) == strip_timing(want.train_state["history"])


def _idx(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + data


def test_data_dir_on_s3_is_fetched_once_per_node(s3, fault_proxy, tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 256), ("t10k", 64)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        s3.write(f"datasets/MNIST/raw/{split}-images-idx3-ubyte",
                 _idx(0x803, (n, 28, 28), images.numpy().tobytes()))
        s3.write(f"datasets/MNIST/raw/{split}-labels-idx1-ubyte",
                 _idx(0x801, (n,), labels.numpy().tobytes()))
    # Through the proxy (no faults) to count who downloads what.
    env = {**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url, "FTT_DATA_CACHE": str(tmp_path / "cache")}
    r = run_train(["--dataset", "mnist", "--data-dir", s3.uri("datasets"), "--epochs", "1",
                   "--batch-size", "64", "--log-every-steps", "0", "--save-every-seconds", "0",
                   "--checkpoint-dir", s3.uri("mnist-run")], nproc=NPROC, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("fetching --data-dir s3://ftt-test/datasets (4 files") == 1
    gets = [r.target for r in fault_proxy.requests if r.method == "GET" and "-ubyte" in r.target]
    assert len(gets) == len(set(gets)) == 4  # one download per file: rank 1 waited for rank 0
    cached = list((tmp_path / "cache").glob("*/MNIST/raw/*-ubyte"))
    assert len(cached) == 4 and list((tmp_path / "cache").glob("*/.complete"))
    assert s3.committed("mnist-run") == [4]
