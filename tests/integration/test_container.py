"""The CPU image, built with podman and run as the Kubernetes manifests run it: as user 10001,
with /dev/shm and a checkpoint volume mounted, PID 1 the image's own entry point (ftrain-run)
with the default job on 2 workers. Opt-in: ``pytest -m container`` (docs/development/testing.md);
skipped where podman is missing. The build makes its base image first when it is missing
(launch/container_base.sh) and takes the torch it can reach (tests/harness/containers.py).

In a container the process that gets SIGTERM is PID 1, and the exit code the kubelet sees is
PID 1's: a SIGKILL (``podman kill -s KILL``, the OOM killer) must leave a checkpoint to restart
from, ``podman stop`` (SIGTERM, SIGKILL after the grace period) an emergency checkpoint and 143,
a bad flag 2; the same container started again resumes, and ends bitwise equal to an
uninterrupted run in a container."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from ftrain.checkpoint import load_uri
from tests.harness import containers
from tests.harness.checkpoints import assert_bitwise_equal, committed_steps, latest_committed
from tests.harness.containers import IMAGE, UID, call
from tests.harness.logs import events
from tests.harness.processes import free_port, wait_for

pytestmark = [pytest.mark.container, pytest.mark.slow]

# The default job (the built-in CNN on synthetic data), shrunk: 64 steps per epoch, 256 in all,
# a checkpoint every 10. JSON logs: the harness reads the resume back as an event.
ARGS = ["--synthetic-train-size", "4096", "--synthetic-test-size", "512", "--batch-size", "64",
        "--epochs", "4", "--log-every-steps", "0", "--save-every-seconds", "0",
        "--save-every-steps", "10", "--log-format", "json", "--checkpoint-dir", "/ckpt"]
TOTAL_STEPS = 256
NPROC = 2
METRICS_PORT = 9090  # inside the container; published on a free port of the host
EMERGENCY = re.compile(r"stopped at step (\d+) after an emergency checkpoint")


def say(request, line: str) -> None:
    """A line in pytest's own output (build time, image size, the signals' outcomes)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(line, flush=True)


@pytest.fixture(scope="module")
def image(request, tmp_path_factory) -> str:
    why = containers.missing()
    if why:
        pytest.skip(why)
    started = time.monotonic()
    base, made = containers.ensure_base()
    base_s = time.monotonic() - started
    started = time.monotonic()
    torch_note, _ = containers.build(tmp_path_factory.mktemp("build"), base)
    build_s = time.monotonic() - started
    size = containers.image_size(IMAGE)
    say(request, f"\ncontainer: base {base} ({f'made in {base_s:.0f}s' if made else 'present'}); "
                 f"{IMAGE} built in {build_s:.0f}s, {size / 1e9:.2f} GB; torch: {torch_note}")
    return IMAGE


def volume(path: Path) -> Path:
    """A host folder the image's user may write (Kubernetes: fsGroup; here: chown)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


def run_detached(name: str, image: str, ckpt: Path, args: list[str],
                 extra: tuple[str, ...] = ()) -> None:
    """Start a container as the manifests run one: the image's user, /dev/shm (an emptyDir of
    medium Memory there), a checkpoint volume, the image's entry point on ``NPROC`` workers."""
    call("run", "--detach", "--name", name, *containers.run_options(),
       "--user", f"{UID}:{UID}", "--shm-size", "512m", "-v", f"{volume(ckpt)}:/ckpt", *extra,
       "--entrypoint", json.dumps(containers.entrypoint(NPROC)), image, *args)


def running(name: str) -> bool:
    r = call("container", "inspect", "--format", "{{.State.Running}}", name, check=False)
    return r.stdout.strip() == "true"


def scrape(port: int) -> dict[str, float]:
    """The /metrics samples without labels, from the host; raises while nothing answers."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return {name: float(value) for name, value in
            re.findall(r"^(ftrain_[a-z_]+) (\S+)$", text, re.MULTILINE)}


@pytest.fixture
def names(request):
    """Container names for this test, removed afterwards whatever happened."""
    made: list[str] = []

    def name(label: str) -> str:
        made.append(f"ftrain-test-{os.getpid()}-{request.node.name[:40]}-{label}")
        return made[-1]

    yield name
    for n in made:
        containers.remove(n)


def test_image_runs_as_its_user_and_keeps_no_pip_settings(image):
    """The image's user is the manifests' runAsUser; the build's pip settings were lent, not
    copied in (a build mount leaves only its empty mount point)."""
    assert containers.image_user(image) == f"{UID}:{UID}"
    r = call("run", "--rm", *containers.run_options(), "--entrypoint", "pip", image,
           "config", "list")
    # Only what names this machine (files, folders, indexes): the Dockerfile's ENV sets some
    # PIP_* flags of its own.
    leaked = [value for value in containers.pip_settings().values()
              if "/" in value and value in r.stdout]
    assert not leaked, f"the image keeps this machine's pip settings {leaked}:\n{r.stdout}"


def test_bad_flag_exits_2(image, tmp_path, names):
    name = names("bad-flag")
    run_detached(name, image, tmp_path / "ckpt", [*ARGS, "--no-such-flag"])
    assert containers.exit_code(name) == 2, containers.logs(name)[-3000:]
    assert "--no-such-flag" in containers.logs(name)


def test_killed_stopped_and_restarted_container_resumes_bitwise(image, tmp_path, names,
                                                                  request):
    """One container, as a restart policy treats it: SIGKILLed (137) and started again, it
    resumes from its last checkpoint, with its heartbeat and /metrics seen from the host;
    stopped (143) after an emergency checkpoint and started again, it resumes there and ends
    bitwise equal to an uninterrupted run in another container."""
    ref_dir, ck, probe = tmp_path / "ref", tmp_path / "ckpt", volume(tmp_path / "probe")
    ref = names("reference")
    run_detached(ref, image, ref_dir, ARGS)
    assert containers.exit_code(ref) == 0, containers.logs(ref)[-3000:]

    name, port = names("preempted"), free_port()
    beat = probe / "heartbeat"
    run_detached(name, image, ck, [*ARGS, "--heartbeat-file", "/probe/heartbeat",
                                   "--metrics-port", str(METRICS_PORT)],
                 ("-v", f"{probe}:/probe", "-p", f"127.0.0.1:{port}:{METRICS_PORT}"))

    # SIGKILL to the whole container once a periodic checkpoint is committed.
    assert wait_for(lambda: latest_committed(ck) >= 20, timeout=600, interval=0.2,
                    while_=lambda: running(name)), containers.logs(name)[-3000:]
    call("kill", "--signal", "KILL", name)
    killed = containers.exit_code(name)
    assert killed == 137, containers.logs(name)[-3000:]
    kept = latest_committed(ck)
    assert 20 <= kept < TOTAL_STEPS

    # Started again: it resumes from that checkpoint; the heartbeat and /metrics answer outside.
    call("start", name)
    seen: list[dict[str, float]] = []
    beats: set[int] = set()

    def watched() -> bool:
        if beat.exists():
            beats.add(beat.stat().st_mtime_ns)
        try:
            seen.append(scrape(port))
        except OSError:
            return False
        return seen[-1].get("ftrain_step", 0) > kept and len(beats) >= 3

    assert wait_for(watched, timeout=600, interval=0.1, while_=lambda: running(name)), \
        f"metrics {seen[-1:]}, heartbeats {len(beats)}:\n{containers.logs(name)[-3000:]}"
    assert seen[-1]["ftrain_resumes_total"] == 1
    resumes = list(events(containers.logs(name), "resumed"))
    assert [r["step"] for r in resumes] == [kept] and resumes[0]["uri"] == f"/ckpt/step_{kept:010d}"

    # podman stop: SIGTERM to PID 1 (ftrain-run), SIGKILL only after 60 s.
    call("stop", "--time", "60", name, timeout=180)
    stopped = containers.exit_code(name)
    log = containers.logs(name)
    assert stopped == 143, log[-3000:]
    assert "ftrain-run: got SIGTERM; forwarding it to torchrun" in log
    emergency = [int(m) for e in events(log) for m in EMERGENCY.findall(e.get("message", ""))]
    assert len(emergency) == 1, log[-3000:]
    at = emergency[0]
    assert kept < at < TOTAL_STEPS and committed_steps(ck)[-1] == at

    # Started again: it resumes at the emergency checkpoint and runs to the end.
    call("start", name)
    finished = containers.exit_code(name)
    log = containers.logs(name)
    assert finished == 0, log[-3000:]
    assert [r["step"] for r in events(log, "resumed")] == [kept, at]

    a, b = load_uri(str(ref_dir)), load_uri(str(ck))
    assert a.train_state["step"] == b.train_state["step"] == TOTAL_STEPS
    assert_bitwise_equal(a.model_state(), b.model_state())
    say(request, f"\ncontainer: SIGKILL -> exit {killed}, restarted from step {kept}; "
                 f"podman stop (SIGTERM) -> exit {stopped}, emergency checkpoint at step {at}, "
                 f"restarted from it -> exit {finished} at step {TOTAL_STEPS}, weights bitwise "
                 f"equal to the uninterrupted container's")
