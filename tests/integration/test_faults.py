"""Training with S3 checkpoints while storage misbehaves (the fault proxy of tests/harness/s3.py):
503s, 500s, connection resets before and after S3 handled a request, answers held back past the
read timeout. Training completes and every committed checkpoint verifies; a damaged newest
checkpoint is skipped on resume; storage that stays down ends the job with the retryable 140."""

from __future__ import annotations

import json
import re

import pytest

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import load_uri, open_uri, step_dirname
from ftrain.runtime import exitcodes
from tests.harness.checkpoints import assert_bitwise_equal
from tests.harness.processes import SMALL, ckpt, run_train
from tests.harness.s3 import CORRUPTIONS, Fault, save_checkpoint

pytestmark = pytest.mark.slow

# 16 steps per epoch, 2 epochs; a checkpoint every 4 steps.
ARGS = [*SMALL, "--synthetic-train-size", "1024", "--save-every-steps", "4", "--keep-last", "100"]
STEPS = [4, 8, 12, 16, 20, 24, 28, 32]
SECRET = "fAuLtS-sEcReT-0123456789abcdefghij"


def test_training_through_faulty_s3_completes_and_resume_skips_damage(s3, fault_proxy, capsys):
    uri = s3.uri("run")
    # Endpoint and credentials from --storage-options alone (the AWS_* credentials are blank):
    # the secret must not appear in any log line, manifest or object.
    options = {"endpoint_url": fault_proxy.url, "key": "AKIDFAULTS", "secret": SECRET,
               "config_kwargs": {"read_timeout": 2}}
    env = {**s3.env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    args = [*ARGS, "--checkpoint-dir", uri, "--storage-options", json.dumps(options)]
    fault_proxy.set_faults(
        Fault("reset_after", method="PUT", every=5),  # uploaded, answer lost
        Fault("503", every=7), Fault("500", every=17), Fault("reset", every=11),
        Fault("slow", every=13, times=2, delay=3.0))  # past the 2 s read timeout
    r = run_train(args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    injected = fault_proxy.injected()
    assert set(injected) == {"reset_after", "503", "500", "reset", "slow"}, injected
    assert re.search(r"failed \(.*\); retry 1/4", r.stderr)
    assert "SAVE FAILED" not in r.stderr and "training complete" in r.stderr
    # Saves that came due while a slow, retried persist was in flight were superseded by newer
    # ones (the loop never waits for storage); the newest state always commits.
    committed = s3.committed("run")
    assert committed[-1] == STEPS[-1] and set(committed) <= set(STEPS) and len(committed) >= 2
    if committed != STEPS:
        assert "come due faster than storage takes them" in r.stderr
    assert not s3.multipart_uploads()
    # Every committed checkpoint verifies (read directly, not through the proxy).
    v = ckpt("verify", uri, env=s3.env)
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.splitlines()[-1] == f"{len(committed)} valid, 0 invalid"
    assert SECRET not in r.stdout + r.stderr
    for key in s3.keys("run/"):
        assert SECRET.encode() not in s3.read(key), key

    # The newest checkpoint gets damaged; the same command resumes from the one before, trains
    # the lost steps again and commits the step anew, ending exactly where it ended.
    want = load_uri(uri).state["model"]
    newest = step_dirname(STEPS[-1])
    CORRUPTIONS[1].apply(s3, f"run/{newest}")
    fault_proxy.set_faults()
    assert ckpt_tool.main(["ls", uri]) == 0
    assert re.search(rf"INVALID: .*XXH3-128.*{newest}", capsys.readouterr().out)
    r = run_train(args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert re.search(rf"SKIPPING checkpoint {uri}/{newest}: .*XXH3-128", r.stderr)
    assert f"resumed from {uri}/{step_dirname(committed[-2])}" in r.stderr
    assert f"{uri}/{newest} is committed but invalid" in r.stderr
    assert all(e.valid for e in open_uri(uri)[0].entries())
    got = load_uri(uri)
    assert got.name == newest
    assert_bitwise_equal(got.state["model"], want)


def test_saves_failing_for_good_exit_140(s3, fault_proxy):
    fault_proxy.set_faults(Fault("503", method="PUT"))  # reads work, every upload fails
    env = {**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url}
    r = run_train([*ARGS, "--checkpoint-dir", s3.uri("run"), "--save-every-steps", "2",
                   "--max-failed-saves", "2"], env=env, timeout=300)
    assert r.returncode == exitcodes.STORAGE_FAILED == 140, r.stderr[-4000:]
    assert r.stderr.count("SAVE FAILED") >= 2
    assert "still failing after 5 attempts" in r.stderr
    assert "exiting with 140 (retryable)" in r.stderr
    assert "training complete" not in r.stderr
    assert s3.committed("run") == []


def test_storage_down_at_start_is_retryable_not_invalid(s3, fault_proxy):
    fault_proxy.set_faults(Fault("503"))
    env = {**s3.env, "AWS_ENDPOINT_URL": fault_proxy.url}
    r = run_train([*ARGS, "--checkpoint-dir", s3.uri("run")], env=env, timeout=300)
    assert r.returncode == exitcodes.STORAGE_FAILED, r.stderr[-4000:]
    assert "checkpoint storage failed" in r.stderr and "(retryable)" in r.stderr


def test_no_valid_checkpoint_exits_2_and_says_how_to_start_over(s3):
    uri = s3.uri("run")
    save_checkpoint(uri, 8)
    CORRUPTIONS[0].apply(s3, f"run/{step_dirname(8)}")  # truncated
    r = run_train([*ARGS, "--checkpoint-dir", uri], env=s3.env, timeout=300)
    assert r.returncode == exitcodes.INVALID, r.stderr[-4000:]
    assert re.search(rf"SKIPPING checkpoint {uri}/{step_dirname(8)}: .*truncated", r.stderr)
    assert "none is valid" in r.stderr and "--resume never" in r.stderr
    assert s3.committed("run") == [8]  # nothing was started over it
