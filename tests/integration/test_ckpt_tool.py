"""``python -m src.ckpt`` as a command in a fresh process, on S3 (the tool's subcommands
in-process: tests/unit/test_ckpt_tool.py)."""

from __future__ import annotations

import json

import torch

from tests.harness.checkpoints import assert_bitwise_equal
from tests.harness.processes import ckpt
from tests.harness.s3 import save_checkpoint


def test_cli_in_a_fresh_process_on_s3(s3, tmp_path):
    """The real command line, configured by the AWS variables alone; then by options alone."""
    uri = s3.uri("run")
    save_checkpoint(uri, 32, epochs_done=1)
    want = save_checkpoint(uri, 64, epochs_done=2)
    r = ckpt("verify", uri, env=s3.env)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 valid, 0 invalid", r.stderr
    env = {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}
    options = json.dumps({"endpoint_url": s3.env["AWS_ENDPOINT_URL"]})
    r = ckpt("export", uri, str(tmp_path / "m.pth"), "--storage-options", options,
             env={**env, "AWS_ENDPOINT_URL": ""})
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(torch.load(tmp_path / "m.pth", weights_only=True), want)
