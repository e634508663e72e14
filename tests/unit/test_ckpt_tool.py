"""The ckpt tool (``ftrain.ckpt.main``, in-process) on local folders and s3:// URIs: ls, verify,
inspect --json, export, plot. The store holds two good checkpoints and a newer one with a
flipped byte. (The command in a fresh process: tests/integration/test_ckpt_tool.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from ftrain import ckpt as ckpt_tool
from ftrain.checkpoint import step_dirname
from tests.harness.checkpoints import assert_bitwise_equal
from tests.harness.s3 import CORRUPTIONS, history_rows, save_checkpoint

D32, D64, D96 = step_dirname(32), step_dirname(64), step_dirname(96)


@pytest.fixture
def root(backend):
    """(root URI, weights of the newest valid checkpoint)."""
    uri = backend.uri("run")
    save_checkpoint(uri, 32, epochs_done=1)
    want = save_checkpoint(uri, 64, epochs_done=2)
    save_checkpoint(uri, 96, epochs_done=3)
    CORRUPTIONS[1].apply(backend, f"run/{D96}")  # a flipped byte inside the tensor data
    return uri, want


def run_tool(capsys, *argv: str) -> tuple[int, str, str]:
    code = ckpt_tool.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_verify_inspect_export_plot(root, tmp_path, capsys, caplog):
    uri, want = root
    code, out, _ = run_tool(capsys, "ls", uri)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["STEP", "EPOCH", "TIME", "SIZE", "STATUS"]
    assert [r.split()[0] for r in rows] == ["96", "64", "32"]
    assert "INVALID" in rows[0] and "XXH3-128" in rows[0] and rows[0].endswith(D96)
    for row, epoch in ((rows[1], "2"), (rows[2], "1")):
        assert row.split()[1] == epoch and " valid " in row and "MiB" in row

    code, out, _ = run_tool(capsys, "verify", uri)
    assert code == 1
    assert f"INVALID {uri}/{D96}: " in out and f"valid   {uri}/{D64}" in out
    assert out.splitlines()[-1] == "2 valid, 1 invalid"
    assert run_tool(capsys, "verify", f"{uri}/{D64}")[0] == 0
    code, out, _ = run_tool(capsys, "verify", f"{uri}/{D96}/")
    assert code == 1 and "XXH3-128" in out

    code, out, _ = run_tool(capsys, "inspect", uri, "--json")
    assert code == 0
    info = json.loads(out)
    assert (info["step"], info["epoch"], info["uri"]) == (64, 2, f"{uri}/{D64}")
    assert info["history"] == history_rows(2)
    assert f"SKIPPING checkpoint {uri}/{D96}" in caplog.text  # the fallback is reported
    assert json.loads(run_tool(capsys, "inspect", f"{uri}/{D32}", "--json")[1])["step"] == 32
    code, out, _ = run_tool(capsys, "inspect", uri)
    assert code == 0 and "step         64" in out and "eval_acc" in out

    out_pth = tmp_path / "out" / "model.pth"
    assert run_tool(capsys, "export", uri, str(out_pth))[0] == 0
    assert_bitwise_equal(torch.load(out_pth, weights_only=True), want)
    code, _, err = run_tool(capsys, "export", f"{uri}/{D96}", str(tmp_path / "bad.pth"))
    assert code == 1 and "invalid checkpoint" in err and not (tmp_path / "bad.pth").exists()

    png = tmp_path / "curves.png"
    code, out, _ = run_tool(capsys, "plot", uri, str(png))
    assert code == 0 and "2 epochs" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_empty_roots_and_bad_options(backend, capsys):
    uri = backend.uri("nothing-here")
    code, out, _ = run_tool(capsys, "ls", uri)
    assert code == 0 and "no checkpoints under" in out
    assert run_tool(capsys, "verify", uri)[0] == 1
    code, _, err = run_tool(capsys, "inspect", uri, "--json")
    assert code == 1 and "no valid checkpoint" in err
    code, _, err = run_tool(capsys, "ls", uri, "--storage-options", "{not json")
    assert code == 2 and "error: --storage-options: not valid JSON" in err, err
