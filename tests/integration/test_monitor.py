"""Watching a running job, in real runs: the Prometheus endpoint scraped while training, the
heartbeat file, JSON log lines, the progress bar on a terminal, and TensorBoard event files read
back after a resume."""

from __future__ import annotations

import json
import os
import pty
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.harness import logs
from tests.harness.checkpoints import committed_steps
from tests.harness.processes import (
    ROOT,
    base_env,
    free_port,
    kill_group,
    run_train,
    start_train,
    train_cmd,
)

pytestmark = pytest.mark.slow

QUICK = ["--synthetic-train-size", "1024", "--synthetic-test-size", "128", "--batch-size", "64",
         "--save-every-seconds", "0"]


def scrape(port: int) -> dict[str, float]:
    """The endpoint's samples as {name{labels}: value}; raises if nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_heartbeat_and_json_logs_of_a_resumed_run(tmp_path):
    d, beat, port = tmp_path / "ck", tmp_path / "probe" / "heartbeat", free_port()
    args = [*QUICK, "--synthetic-train-size", "4096", "--epochs", "2", "--save-every-steps", "4"]
    r = run_train([*args, "--max-steps", "6", "--checkpoint-dir", str(d)])
    assert r.returncode == 0, r.stderr[-2000:]
    log = tmp_path / "run.log"
    proc = start_train([*args, "--log-every-steps", "5",
                        "--checkpoint-dir", str(d), "--metrics-port", str(port),
                        "--heartbeat-file", str(beat), "--log-format", "json"], log_path=log)
    seen: list[dict[str, float]] = []
    beats: list[float] = []
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                m = scrape(port)
            except OSError:
                time.sleep(0.05)
                continue
            seen.append(m)
            if beat.exists():
                beats.append(beat.stat().st_mtime_ns)
            if m["ftrain_saves_committed_total"] >= 2 and m.get("ftrain_loss") is not None \
                    and len(set(beats)) >= 3:
                break
            time.sleep(0.05)
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        kill_group(proc)
    assert seen, "the metrics endpoint never answered: " + log.read_text()[-2000:]
    m = seen[-1]
    assert m["ftrain_resumes_total"] == 1  # the second run resumed from the first's checkpoint
    assert m["ftrain_step"] > 6 and m["ftrain_epoch"] in (1, 2)
    assert m["ftrain_saves_committed_total"] >= 2 and m["ftrain_last_checkpoint_step"] >= 8
    assert m["ftrain_last_checkpoint_step"] % 4 == 0
    assert m["ftrain_saves_failed_total"] == 0 and m["ftrain_saves_dropped_total"] >= 0
    assert 0 <= m["ftrain_seconds_since_last_checkpoint"] < 60
    assert m["ftrain_save_stall_seconds"] > 0 and m["ftrain_samples_per_second"] > 0
    assert m["ftrain_loss"] > 0 and m["ftrain_train_metric{name=loss}"] == m["ftrain_loss"]
    assert 0 <= m["ftrain_train_metric{name=acc}"] <= 1
    assert [s["ftrain_step"] for s in seen] == sorted(s["ftrain_step"] for s in seen)
    # The heartbeat was created at start-up and touched as training went on.
    assert len(set(beats)) >= 3, beats
    # Every line is one JSON object with the rank; progress lines carry the figures as fields.
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all(x["rank"] == 0 and x["level"] and x["message"] for x in lines)
    steps = [x for x in lines if x.get("event") == "step"]
    assert steps and all({"step", "epoch", "metrics", "lr", "samples_per_s"} <= set(x)
                         for x in steps)
    assert [x["step"] % 5 for x in steps] == [0] * len(steps)
    assert any(x.get("event") == "epoch" and "eval_acc" in x for x in lines)
    # The lines a program acts on are events, read back by the harness as the chaos tool does.
    text = log.read_text()
    resumed = logs.resumed(text)
    assert resumed == {**resumed, "step": 6, "epoch": 0, "batch_in_epoch": 6,
                       "uri": f"{d}/step_0000000006"}
    committed = list(logs.events(text, "committed"))
    assert any(c["step"] % 4 == 0 for c in committed)
    assert all(c["uri"] == f"{d}/step_{c['step']:010d}" and c["mib"] > 0 and c["seconds"] >= 0
               for c in committed)
    assert logs.slowest_save_s(text) == max(c["seconds"] for c in committed)
    assert logs.epoch_done(text, 1) and logs.saves_failed(text) == 0


def test_metrics_port_in_use_is_refused_with_the_flag_named(tmp_path):
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_train([*QUICK, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                       "--metrics-port", str(port)])
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--metrics-port {port}: cannot listen on it" in r.stderr
    assert committed_steps(tmp_path / "ck") == []


def test_config_error_in_json_mode_is_one_json_line(tmp_path):
    r = run_train(["--batch-size", "0", "--log-format", "json"])
    assert r.returncode == 2
    (line,) = [json.loads(x) for x in r.stderr.splitlines() if x.strip()]
    assert line["level"] == "ERROR" and "--batch-size: must be > 0" in line["message"]


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_resumes_into_the_same_curves_without_duplicates(tmp_path):
    args = [*QUICK, "--epochs", "2", "--log-every-steps", "1", "--save-every-steps", "8"]
    ref = run_train([*args, "--checkpoint-dir", str(tmp_path / "ref"),
                     "--tensorboard", str(tmp_path / "tb-ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    cut, tb = tmp_path / "cut", tmp_path / "tb"
    r = run_train([*args, "--max-steps", "12", "--checkpoint-dir", str(cut),
                   "--tensorboard", str(tb)])
    assert r.returncode == 0, r.stderr[-2000:]
    # A crash after step 12 whose last checkpoint is step 8: steps 9-12 were already written
    # to the event file and are trained (and written) again after the resume.
    shutil.rmtree(cut / "step_0000000012")
    assert max(committed_steps(cut)) == 8
    r = run_train([*args, "--checkpoint-dir", str(cut), "--tensorboard", str(tb)])
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # the same folder, two writers
    want, got = tensorboard_scalars(tmp_path / "tb-ref"), tensorboard_scalars(tb)
    assert {"train/loss", "train/acc", "train/lr", "epoch/train_loss", "epoch/eval_acc"} <= set(got)
    assert set(got) == set(want)
    for tag in ("train/loss", "train/acc", "train/lr", "epoch/train_loss", "epoch/eval_loss",
                "epoch/eval_acc"):
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)), f"{tag}: duplicate or unordered steps {steps}"
        assert got[tag] == want[tag], tag  # the same points as the uninterrupted run
    assert [s for s, _ in got["train/loss"]] == list(range(1, 33))
    assert [s for s, _ in got["epoch/eval_acc"]] == [16, 32]


def test_progress_bar_on_a_terminal_replaces_the_periodic_lines(tmp_path):
    parent, child = pty.openpty()
    proc = subprocess.Popen(train_cmd([*QUICK, "--epochs", "1", "--log-every-steps", "4",
                                       "--checkpoint-dir", str(tmp_path / "ck")]),
                            cwd=ROOT, env=base_env({"COLUMNS": "120"}), stdout=subprocess.PIPE,
                            stderr=child, text=False)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    os.close(parent)
    out = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/1:" in out and "/16 [" in out, out[-2000:]  # the bar, redrawn in place
    assert "step/s" in out or "s/step" in out
    assert "loss=" in out  # the periodic figures, in the bar
    assert "  batch 4/16  " not in out  # and not as log lines
    assert "epoch 1/1 done:" in out  # epoch lines still go to the log, above the bar
    # Without a terminal (the tests' other runs), the same run prints plain periodic lines.
    r = run_train([*QUICK, "--epochs", "1", "--log-every-steps", "4",
                   "--checkpoint-dir", str(tmp_path / "ck2")])
    assert "  batch 4/16  " in r.stderr and "step/s" not in r.stderr


def _step_events(stderr: str) -> dict[int, dict]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {e["step"]: e for e in events if e.get("event") == "step"}


@pytest.mark.slow
def test_logged_step_figures_are_the_jobs_not_rank_0s(tmp_path):
    """The periodic loss, the task's metrics and the gradient norm are those of the global
    batch: 2 workers log what one process logs for the same steps."""
    args = ["--model", "mlp", "--synthetic-train-size", "1024", "--batch-size", "64",
            "--epochs", "1", "--log-every-steps", "4", "--clip-grad-norm", "5",
            "--log-format", "json", "--save-every-seconds", "0"]
    logged = {}
    for nproc in (0, 2):
        r = run_train([*args, "--checkpoint-dir", str(tmp_path / str(nproc))], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        logged[nproc] = _step_events(r.stderr)
    assert sorted(logged[0]) == sorted(logged[2]) == [4, 8, 12, 16]
    for step, one in logged[0].items():
        two = logged[2][step]["metrics"]
        assert set(one["metrics"]) == set(two) == {"loss", "acc", "grad_norm"}
        for name, value in one["metrics"].items():
            assert two[name] == pytest.approx(value, rel=1e-5), (step, name)
