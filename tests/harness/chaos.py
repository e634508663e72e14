"""Chaos test: kill the training job at random moments, restart it, and check that it ends
exactly as an uninterrupted run does.

    python -m launch.chaos --nproc 2 --kills 4 --seed 1            # what CI runs
    python -m launch.chaos --nproc 4 --kills 50 --seed 4           # the long, opt-in run
    python -m launch.chaos --nproc 2 --kills 8 -- --model mlp      # training flags after --
    python -m launch.chaos --nproc 2 --kills 4 --seed 1 --parallel fsdp   # sharded (FSDP2)
    python -m launch.chaos --nproc 2 --kills 4 --task examples.charlm:CharLM \
        --task-args '{"context": 32, "d_model": 64, "layers": 1, "max_train_chars": 65600}'
    python -m launch.chaos --nproc 2 --kills 4 --seed 1 --storage s3 --storage-faults 0.1

The tool sets --checkpoint-dir and --trace-samples itself.

First it runs (or reuses, when its command is unchanged) an uninterrupted reference run in
WORKDIR/reference. Then it starts the same job under torchrun in WORKDIR/chaos again and again.
In each attempt it picks a signal (--signals), a target (--targets) and a moment, and kills:

    worker     one worker process (a random rank); torchrun then tears the group down
    launcher   SIGTERM: torchrun alone, as Kubernetes signals PID 1; torchrun forwards it
               SIGKILL: every process of the job (torchrun starts each worker in a session of
               its own, so this kills torchrun's process group and each worker's): a node or
               container dying
    moments    start-up, training, inside a checkpoint save (held half-written by the test-only
               FTT_TEST_PAUSE_IN_SAVE), or right after an epoch's last step (evaluation, or the
               epoch checkpoint)

It restarts the job after every kill until it exits 0, then checks, against the reference:
final weights bit for bit, the metric history (wall-clock fields ignored), that every step saw
the reference's samples (--trace-samples), that no SIGTERM lost a completed step, that no
SIGKILL lost more than the lost-work bound (the save interval plus two of the slowest saves,
snapshot to commit, as logged, in steps of the reference's step time: see the Checkpointer),
that no worker exited with a permanent code
(1-127), and that nothing hung or outlived its launcher. It prints a summary, writes it to
WORKDIR/summary.json and exits 0 on PASS, 1 on FAIL. Linux only (it reads /proc).

Faults together (--storage s3): the tool starts moto's S3 server and the fault proxy of
tests/harness/s3lab.py in its own process (moto is a test dependency: pip install -e '.[test]'), and
every attempt checkpoints to s3://ftrain-chaos/chaos through the proxy (AWS_ENDPOINT_URL and
test credentials in the job's environment, none of the caller's AWS_* variables, storage
retries short but ten deep: CHAOS_RETRIES). --storage-faults SHARE makes that share of the
attempts' storage requests fail or stall, drawn from --seed among --storage-fault-kinds:

    503 / 500     the proxy answers SlowDown / InternalError itself
    reset         the connection is reset before the request reaches S3
    reset_after   S3 handles the request, the answer is lost (a reset)
    slow          the answer is held back SLOW_FAULT_S (0.25 s)

while the kills go on as above. The reference stays on local disk, without faults: the same
command as the local mode's, so one reference serves both (and the tests), and comparing the
S3 run with it bit for bit also checks that local disk and S3 behave the same. The final
checkpoint is read from S3 (straight from moto, not through the proxy). A worker may exit 140
(storage failed after retries: retryable); such an attempt is restarted, as a restart policy
would, and counted; a permanent exit (1-127) is a failure as always. A SIGKILL in an attempt
whose save failed is not held to the lost-work bound (it assumes saves commit), nor a SIGTERM
whose emergency checkpoint failed (the job logs it and exits retryable) to losing nothing; both
are listed. While faults are injected the bound takes the slowest save of the whole run. The summary adds the requests
the proxy saw, the faults it injected by kind, the storage retries and failed saves the job
logged ("SAVE FAILED") and the exits 140.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftrain.runtime.exitcodes import RETRYABLE_FLOOR, STORAGE_FAILED
from tests.harness import logs
from tests.harness.checkpoints import (
    TIMING_FIELDS,
    committed_of,
    half_written_of,
    latest_committed,
    local_names,
    strip_timing,
)
from tests.harness.processes import kill_all, processes_matching, rank_of, wait_for
from tests.harness.s3lab import (
    ACTIONS,
    INSTALL_HINT,
    FaultProxy,
    MotoMissing,
    MotoServer,
    RandomFaults,
    s3_env,
)
from tests.harness.stores import PAUSE_ENV, slow_store_env
from tests.harness.traces import read_trace

ROOT = Path(__file__).resolve().parents[2]

# Small and fast: 32 steps per epoch, each restart costs little more than torchrun's start-up.
# A test set as large as the training set makes evaluation long enough to be hit by kills.
# The built-in task's data flags: another --task has options of its own (they would be refused).
BUILTIN_DATA_ARGS = ["--synthetic-train-size", "2048", "--synthetic-test-size", "2048"]
DEFAULT_TRAIN_ARGS = [*BUILTIN_DATA_ARGS, "--batch-size", "64", "--save-every-steps", "3",
                      "--save-every-seconds", "0", "--log-every-steps", "0"]
STEPS_PER_KILL = 12  # --epochs, when not given, leaves about this many steps to each kill
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
TARGETS = ("worker", "launcher")
# Planned moment -> weight. The labels reported are what was observed at the kill.
MOMENTS = {"start-up": 0.1, "training": 0.45, "save": 0.3, "epoch-end": 0.15}
POLL_S = 0.01


# ---------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """The chaos run's checkpoint root as the tool watches it: ``uri`` (and the storage
    ``options`` load_uri needs to read it), the "step_N/file" names below it."""

    poll_s = POLL_S  # how often a wait looks again
    uri: str = ""
    options: dict[str, Any] | None = None

    def clear(self) -> None:
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def latest(self) -> int:
        """The newest committed step, 0 when none is."""
        steps = committed_of(self.names())
        return steps[-1] if steps else 0

    def half_written(self) -> set[str]:
        return half_written_of(self.names())


class LocalCheckpoints(Checkpoints):
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.uri = str(self.folder)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def names(self) -> list[str]:
        return local_names(self.folder)


class S3Checkpoints(Checkpoints):
    """Checkpoints below ``s3://bucket/prefix``, read straight from the moto server ``server``
    (an s3lab.MotoServer), never through the fault proxy: the tool's own reads are neither
    faulted nor counted."""

    poll_s = 0.05  # each look is an HTTP request

    def __init__(self, server, bucket: str, prefix: str) -> None:
        self.server, self.bucket, self.prefix = server, bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.options = {"endpoint_url": server.url, "key": "testing", "secret": "testing",
                        "client_kwargs": {"region_name": "us-east-1"}}

    def clear(self) -> None:
        client = self.server.client
        client.create_bucket(Bucket=self.bucket)
        for name in self.names():
            client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def names(self) -> list[str]:
        pages = self.server.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/")
        return [o["Key"][len(self.prefix) + 1:] for page in pages for o in
                page.get("Contents", [])]


def flag_value(args: list[str], name: str, default: str) -> str:
    """The value the training command line gives ``name`` (the last one wins)."""
    value = default
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def effective_train_args(extra: list[str], kills: int) -> list[str]:
    """DEFAULT_TRAIN_ARGS, the user's flags, and --epochs sized to leave room for the kills."""
    args = [*DEFAULT_TRAIN_ARGS, *extra]
    if "--task" in extra:
        args = args[len(BUILTIN_DATA_ARGS):]
    if not any(a == "--epochs" or a.startswith("--epochs=") for a in extra):
        # Another task's epoch length is not known here: sized as the built-in default's.
        steps = (int(flag_value([*BUILTIN_DATA_ARGS, *args], "--synthetic-train-size", "12288"))
                 // int(flag_value(args, "--batch-size", "256")))
        args += ["--epochs", str(max(2, math.ceil((kills + 1) * STEPS_PER_KILL / max(steps, 1))))]
    return args


# ---------------------------------------------------------------------------- one launch
class Job:
    """One torchrun launch of the training command, in a session of its own.

    Its processes are found by ``trace_dir`` (unique per launch) in their command lines.
    ``ckpt_dir`` is a local folder or a URI; ``env`` is added to this process's environment
    (a value None removes the variable).
    """

    def __init__(self, nproc: int, train_args: list[str], ckpt_dir: Path | str, trace_dir: Path,
                 log_path: Path, env: dict[str, str | None] | None = None) -> None:
        self.ckpt_dir, self.trace_dir, self.log_path = ckpt_dir, Path(trace_dir), log_path
        self.marker = str(self.trace_dir)
        self.cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(nproc), "-m", "src.train", *train_args,
                    "--checkpoint-dir", str(ckpt_dir), "--trace-samples", self.marker]
        self.env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.setdefault("FTT_LOG_FORMAT", "json")  # read back as events (harness/logs.py)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value
        if self.env.get(PAUSE_ENV):  # commits held: the harness's slow store, injected
            self.env = slow_store_env(float(self.env[PAUSE_ENV]), self.env)
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.startup_s = 0.0  # set by run_to_end

    def start(self) -> Job:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.monotonic()
        return self

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> dict[int, int]:
        """pid -> ppid of torchrun, its workers and theirs (the marker is in every command)."""
        return processes_matching(self.marker)

    def workers(self) -> list[int]:
        return sorted(p for p, parent in self.processes().items() if parent == self.proc.pid)

    def training_started(self) -> bool:
        return any(p.stat().st_size for p in self.trace_dir.glob("rank*.jsonl"))

    def steps_done(self) -> int:
        """Steps rank 0 has trained in this launch (cheap: counts its trace lines)."""
        return sum(p.read_bytes().count(b"\n") for p in self.trace_dir.glob("rank0-*.jsonl"))

    def trained_steps(self) -> set[int]:
        return {line["step"] for line in read_trace(self.trace_dir)}

    def epoch_ended(self, steps_per_epoch: int) -> int | None:
        """The latest epoch whose last batch rank 0 trained in this launch, if any."""
        epoch = None
        for path in self.trace_dir.glob("rank0-*.jsonl"):
            for line in path.read_text().splitlines(keepends=True):
                if f'"batch": {steps_per_epoch - 1},' in line and line.endswith("\n"):
                    epoch = json.loads(line)["epoch"]
        return epoch

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int, target: str, rng: random.Random) -> tuple[str, int, int | None]:
        """Send ``sig`` to ``target``; returns (target hit, pid, rank)."""
        if target == "worker":
            workers = self.workers()
            if workers:
                pid = rng.choice(workers)
                rank = rank_of(pid)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                return "worker", pid, rank
            # No worker yet (torchrun is still starting): the launcher is all there is.
        if sig == signal.SIGKILL:
            kill_all([self.proc.pid, *self.processes()], signal.SIGKILL)
        else:
            os.kill(self.proc.pid, sig)
        return "launcher", self.proc.pid, None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_until(self, predicate, timeout: float, interval: float = POLL_S) -> bool:
        """Poll ``predicate``; False on timeout or when the job exits first."""
        return wait_for(predicate, timeout, interval, while_=self.running)

    def sleep(self, seconds: float) -> bool:
        """Sleep while the job runs; False when it exits first."""
        self.wait_until(lambda: False, seconds)
        return self.running()

    def reap(self, grace: float = 60.0) -> int:
        """After the launcher exited: wait for its processes to go; SIGKILL and count those
        that outlive ``grace``."""
        if wait_for(lambda: not self.processes(), grace, 0.1):
            return 0
        strays = list(self.processes())
        kill_all(strays, signal.SIGKILL)
        return len(strays)

    def stop(self) -> None:
        """Kill everything of this job (used on errors and Ctrl-C)."""
        if self.proc is not None:
            kill_all([self.proc.pid, *processes_matching(self.marker)], signal.SIGKILL)
            self.proc.wait()


def run_to_end(job: Job, timeout: float) -> int:
    """Start ``job`` and wait for it; sets ``job.startup_s`` (launch to first trained step).
    Raises RuntimeError when it hangs."""
    job.start()
    job.wait_until(job.training_started, timeout)
    job.startup_s = job.elapsed
    rc = job.wait(max(timeout - job.elapsed, 1.0))
    if rc is None:
        job.stop()
        raise RuntimeError(f"{' '.join(job.cmd)} did not finish within {timeout:.0f}s; see "
                           f"{job.log_path}")
    job.reap()
    return rc


# ---------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """The uninterrupted run, and what it measured for timing the kills."""

    folder: str
    nproc: int
    train_args: list[str]
    torch: str
    total_steps: int = 0
    steps_per_epoch: int = 0
    startup_s: float = 0.0
    step_s: float = 0.0
    wall_s: float = 0.0
    train_step_s: float = 0.0  # per step of the fastest epoch's training (no evaluation)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.folder, "ckpt")

    @property
    def trace_dir(self) -> Path:
        return Path(self.folder, "trace")


def ensure_reference(folder: Path, nproc: int, train_args: list[str],
                     timeout: float = 3600.0) -> Reference:
    """Reuse the reference run in ``folder`` when it ran the same command; else run it."""
    import torch

    from ftrain.checkpoint import load_uri

    want = Reference(str(folder), nproc, list(train_args), torch.__version__)
    meta_path = Path(folder, "reference.json")
    if meta_path.exists():
        old = Reference(**json.loads(meta_path.read_text()))
        if ((old.nproc, old.train_args, old.torch) == (nproc, want.train_args, want.torch)
                and old.total_steps and latest_committed(old.ckpt_dir) == old.total_steps):
            old.folder = str(folder)  # the folder may have moved since
            return old
    shutil.rmtree(folder, ignore_errors=True)
    job = Job(nproc, train_args, want.ckpt_dir, want.trace_dir, Path(folder, "log.txt"))
    rc = run_to_end(job, timeout)
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}); see {job.log_path}")
    loaded = load_uri(str(want.ckpt_dir))
    want.total_steps = int(loaded.manifest.step)
    want.steps_per_epoch = int(loaded.train_state["steps_per_epoch"])
    want.wall_s = job.elapsed
    want.startup_s = job.startup_s
    want.step_s = max(want.wall_s - job.startup_s, 0.1) / max(want.total_steps, 1)
    want.train_step_s = min((float(h["seconds"]) / want.steps_per_epoch
                             for h in loaded.train_state["history"] if h.get("seconds")),
                            default=want.step_s)
    meta_path.write_text(json.dumps(asdict(want), indent=1))
    return want


def shared_reference(tmp_path_factory, nproc: int, train_args: list[str]) -> Reference:
    """The reference run of ``train_args`` on ``nproc`` workers, run once per test session and
    shared by every test that needs the same one, also across pytest-xdist's processes (they
    share the session's temporary root; a file lock makes the others wait for the first). The
    folder is named by the command, so two different references never overwrite each other."""
    import hashlib

    from filelock import FileLock  # a dependency of torch

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each xdist process has a folder of its own under the session's
    key = hashlib.sha256(json.dumps([nproc, list(train_args)]).encode()).hexdigest()[:12]
    folder = root / f"reference-{nproc}w-{key}"
    with FileLock(str(folder) + ".lock"):
        return ensure_reference(folder, nproc, train_args)


# ---------------------------------------------------------------------------- comparison
def compare_runs(ref: Reference, ckpt_dir: Path | str, trace_dirs: list[Path],
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final weights, history and sample sequence of a run against the reference.

    ``ckpt_dir``: the run's checkpoint root, a folder or a URI (read with storage ``options``).
    Returns {"problems": [...], "weights": ..., "history": ..., "samples": ...} (text).
    """
    import torch

    from ftrain.checkpoint import load_uri

    out: dict[str, Any] = {"problems": []}
    problems = out["problems"]
    want = load_uri(str(ref.ckpt_dir))
    try:
        got = load_uri(str(ckpt_dir), options)
    except Exception as e:  # noqa: BLE001 - no valid checkpoint: reported, not raised
        problems.append(f"no valid final checkpoint in {ckpt_dir}: {e}")
        return out
    if got.manifest.step != want.manifest.step:
        problems.append(f"final step {got.manifest.step}, reference {want.manifest.step}")
    a, b = want.model_state(), got.model_state()  # any layout
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or
                    a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                    or not torch.equal(a[k], b[k]))
    if differ:
        worst = max(((a[k].double() - b[k].double()).abs().max().item()
                     for k in differ if k in a and k in b and a[k].shape == b[k].shape),
                    default=float("nan"))
        out["weights"] = f"DIFFER in {len(differ)} of {len(a)} tensors (max abs diff {worst:.3g})"
        problems.append(f"weights differ: {', '.join(differ[:5])}")
    else:
        out["weights"] = f"bitwise identical ({len(a)} tensors)"
    ha, hb = strip_timing(want.train_state["history"]), strip_timing(got.train_state["history"])
    if ha == hb:
        out["history"] = f"identical ({len(ha)} epochs; {', '.join(TIMING_FIELDS)} ignored)"
    else:
        first = next((i for i, (x, y) in enumerate(zip(ha, hb, strict=False)) if x != y),
                     min(len(ha), len(hb)))
        out["history"] = f"DIFFERS from epoch {first + 1}"
        problems.append(f"history differs from epoch {first + 1}: "
                        f"{hb[first] if first < len(hb) else 'missing'} vs "
                        f"{ha[first] if first < len(ha) else 'missing'}")
    out["samples"] = _compare_samples(ref, trace_dirs, problems)
    return out


def _compare_samples(ref: Reference, trace_dirs: list[Path], problems: list[str]) -> str:
    expected = {(t["step"], t["rank"]): t["idx"] for t in read_trace(ref.trace_dir)}
    seen_steps: set[int] = set()
    wrong = []
    for folder in trace_dirs:
        for t in read_trace(folder):
            seen_steps.add(t["step"])
            if expected.get((t["step"], t["rank"])) != t["idx"]:
                wrong.append(t["step"])
    missing = {s for s, _ in expected} - seen_steps
    if wrong:
        problems.append(f"steps {sorted(set(wrong))[:10]} trained other samples than the reference")
    if missing:
        problems.append(f"steps {sorted(missing)[:10]} never ran")
    if wrong or missing:
        return f"DIFFER ({len(set(wrong))} steps with other samples, {len(missing)} missing)"
    return f"every step saw the reference's samples; all {ref.total_steps} steps ran"


# ---------------------------------------------------------------------------- chaos
@dataclass
class Kill:
    signal: str
    target: str
    moment: str
    pid: int
    rank: int | None
    at_s: float  # seconds after the launch
    step: int  # highest step trained in this attempt when the kill was sent


@dataclass
class Attempt:
    index: int
    rc: int | None = None
    wall_s: float = 0.0
    kill: Kill | None = None
    trained: int = 0  # steps trained in this attempt
    committed_before: int = 0
    committed_after: int = 0
    lost: int = 0  # steps of this attempt past the checkpoint the next one resumes from
    slowest_save_s: float = 0.0  # the slowest commit logged, snapshot to commit
    paused_saves: bool = False  # every save of this attempt was held by PAUSE_ENV
    worker_exits: list[int] = field(default_factory=list)
    hung: bool = False
    strays: int = 0
    saves_failed: int = 0  # "SAVE FAILED" lines logged (retries exhausted)
    emergency_failed: bool = False  # a SIGTERM's emergency checkpoint failed (logged)
    survivors_missed: list[str] = field(default_factory=list)  # why no survivor checkpoint
    storage_retries: int = 0  # storage calls retried, as logged


@dataclass
class Plan:
    signal: str
    target: str
    moment: str


class Chaos:
    """The attempts: start the job, kill it as planned, restart, until it finishes.

    ``checkpoints``: where the attempts write their checkpoints (default: FOLDER/ckpt on local
    disk); ``env``: added to every attempt's environment; ``storage_faults``: storage fails on
    purpose, so an attempt that ends with the retryable storage exit (140) without a kill is
    restarted, as a restart policy would, instead of counting as a failure.
    """

    def __init__(self, ref: Reference, folder: Path, kills: int, seed: int, signals: list[str],
                 targets: list[str], pause_in_save: float, attempt_timeout: float,
                 log=print, checkpoints: Checkpoints | None = None,
                 env: dict[str, str | None] | None = None, storage_faults: bool = False) -> None:
        self.ref, self.folder, self.kills = ref, Path(folder), kills
        self.rng = random.Random(seed)
        self.signals, self.targets = signals, targets
        self.pause_in_save = pause_in_save
        self.attempt_timeout = attempt_timeout
        self.checkpoints = checkpoints or LocalCheckpoints(self.folder / "ckpt")
        self.env = dict(env or {})
        self.storage_faults = storage_faults
        self.attempts: list[Attempt] = []
        self.log = log
        self.save_every = int(flag_value(ref.train_args, "--save-every-steps", "0"))
        self._kinds: list[tuple[str, str]] = []

    def plan(self) -> Plan:
        """Every (signal, target) pair once per round, in random order; a weighted moment."""
        if not self._kinds:
            self._kinds = [(s, t) for s in self.signals for t in self.targets]
            self.rng.shuffle(self._kinds)
        sig, target = self._kinds.pop()
        moments, weights = zip(*MOMENTS.items(), strict=True)
        return Plan(sig, target, self.rng.choices(moments, weights)[0])

    def budget(self, kills_left: int) -> float:
        """Mean steps an attempt trains before its kill: what is left to train spread over
        the kills left, one share kept for the final run (so that every kill lands)."""
        return (self.ref.total_steps - self.checkpoints.latest()) / (kills_left + 1)

    def _after_steps(self, job: Job, steps: int) -> bool:
        """Wait until rank 0 has trained ``steps`` steps in this launch, then a random part of
        one more step, so that kills do not land on step boundaries. False if the job ended."""
        t0 = time.monotonic()
        if not job.wait_until(lambda: job.steps_done() >= steps, self.attempt_timeout):
            return False
        per_step = (time.monotonic() - t0) / steps if steps > 1 else self.ref.step_s
        return job.sleep(self.rng.uniform(0.0, per_step))

    def storage_exit(self, a: Attempt) -> bool:
        """Whether ``a`` ended, unkilled, because storage failed after retries (a worker exited
        140, the others with retryable codes or signals), while storage fails on purpose."""
        return (self.storage_faults and a.kill is None and a.rc != 0 and not a.hung
                and STORAGE_FAILED in a.worker_exits
                and all(c < 0 or c >= RETRYABLE_FLOOR for c in a.worker_exits))

    def run(self) -> list[Attempt]:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.checkpoints.clear()
        kills_done = failures = storage_exits = 0
        while True:
            index = len(self.attempts)
            plan = self.plan() if kills_done < self.kills else None
            attempt = self._attempt(index, plan)
            self.attempts.append(attempt)
            self.log(self._describe(attempt))
            if attempt.kill is not None:
                kills_done += 1
                storage_exits = 0
            elif attempt.rc == 0:
                return self.attempts
            elif self.storage_exit(attempt):
                storage_exits += 1  # retryable: restart, as a restart policy would
                if storage_exits > 10:
                    self.log("giving up: storage fails in every attempt")
                    return self.attempts
            else:
                failures += 1
                if failures > 3:
                    self.log("giving up: the job fails without being killed")
                    return self.attempts

    def _attempt(self, index: int, plan: Plan | None) -> Attempt:
        folder = self.folder / f"attempt_{index:03d}"
        paused = plan is not None and plan.moment == "save"
        env = {**self.env, **({PAUSE_ENV: str(self.pause_in_save)} if paused else {})}
        job = Job(self.ref.nproc, self.ref.train_args, self.checkpoints.uri, folder / "trace",
                  folder / "log.txt", env)
        attempt = Attempt(index, committed_before=self.checkpoints.latest())
        kills_left = self.kills - sum(a.kill is not None for a in self.attempts)
        job.start()
        try:
            if plan is not None:
                attempt.kill = self._kill_when_planned(job, plan, kills_left)
            timeout = 120.0 if attempt.kill else self.attempt_timeout
            attempt.rc = job.wait(timeout)
            if attempt.rc is None:
                attempt.hung = True
                job.stop()
            attempt.strays = job.reap()
        except BaseException:
            job.stop()
            raise
        attempt.wall_s = job.elapsed
        trained = job.trained_steps()
        attempt.trained = len(trained)
        attempt.committed_after = self.checkpoints.latest()
        attempt.lost = sum(s > attempt.committed_after for s in trained)
        attempt.paused_saves = paused
        text = job.log_text()
        attempt.slowest_save_s = logs.slowest_save_s(text)
        attempt.worker_exits = logs.worker_exits(text)
        attempt.saves_failed = logs.saves_failed(text)
        attempt.emergency_failed = logs.emergency_failed(text)
        attempt.survivors_missed = sorted({e.get("reason", "") for e in
                                           logs.events(text, "survivor_checkpoint_missed")})
        attempt.storage_retries = logs.storage_retries(text)
        return attempt

    def _kill_when_planned(self, job: Job, plan: Plan, kills_left: int) -> Kill | None:
        """Wait for the planned moment and kill; None when the job finished first."""
        moment = plan.moment
        stale = self.checkpoints.half_written()  # leftovers of earlier kills
        if moment == "start-up":
            if not job.sleep(self.rng.uniform(0.0, max(self.ref.startup_s, 0.5))):
                return None
            if job.training_started():
                moment = "training"
        else:
            if not job.wait_until(job.training_started, self.attempt_timeout):
                return None
            budget = self.budget(kills_left)
            if moment == "training":
                if not self._after_steps(job, round(self.rng.uniform(0.0, 2 * budget))):
                    return None
            elif moment == "save":
                if not self._after_steps(job, round(self.rng.uniform(0.0, budget))):
                    return None
                if not job.wait_until(lambda: bool(self.checkpoints.half_written() - stale),
                                      60.0, self.checkpoints.poll_s):
                    if not job.running():
                        return None
                    moment = "training"  # no save came: kill anyway
                else:
                    moment = "inside a save"
            else:
                if not job.wait_until(lambda: job.epoch_ended(self.ref.steps_per_epoch) is not None,
                                      self.attempt_timeout):
                    return None
                job.sleep(self.rng.uniform(0.0, 0.1))
                # Rank 0 logs "epoch N/M done" when the evaluation is over: look just before
                # the kill (a SIGTERM lets the evaluation finish).
                epoch = job.epoch_ended(self.ref.steps_per_epoch)
                done = logs.epoch_done(job.log_text(), epoch + 1)
                moment = "epoch-end save" if done else "evaluation"
        step = max(job.trained_steps(), default=0)
        target, pid, rank = job.kill(SIGNALS[plan.signal], plan.target, self.rng)
        return Kill(plan.signal, target, moment, pid, rank, round(job.elapsed, 2), step)

    def _describe(self, a: Attempt) -> str:
        if a.kill is None:
            what = ("ran to the end" if a.rc == 0 else
                    "storage failed after retries (exit 140, retryable)" if self.storage_exit(a)
                    else "FAILED WITHOUT A KILL")
        else:
            k = a.kill
            who = f"rank {k.rank}" if k.target == "worker" else "launcher"
            what = f"{k.signal} {who} at {k.at_s:.1f}s ({k.moment}, step {k.step})"
        return (f"attempt {a.index:3d}: {what}; exit {a.rc}, trained {a.trained} steps, "
                f"resumes at {a.committed_after}, lost {a.lost}"
                + (" HUNG" if a.hung else "") + (f" {a.strays} STRAY" if a.strays else ""))


# ---------------------------------------------------------------------------- S3
# The attempts' storage retries while faults are injected: short back-offs (the faults are
# loopback-fast), and enough attempts that one call meeting a fault in each of them is rare
# (10 in a row at a 10% share: 1e-10).
CHAOS_RETRIES = {"FTT_STORAGE_RETRY_ATTEMPTS": "10", "FTT_STORAGE_RETRY_BASE_DELAY": "0.02",
                 "FTT_STORAGE_RETRY_DEADLINE": "30"}
SLOW_FAULT_S = 0.25  # how long a "slow" fault holds an answer back
BUCKET, PREFIX = "ftrain-chaos", "chaos"


class S3Lab:
    """S3 for the chaos attempts: moto's server in this process, the fault proxy in front of
    it injecting ``rate`` faults, ``checkpoints`` at s3://BUCKET/PREFIX (read directly), and
    ``env``: what points an attempt's training at the proxy."""

    def __init__(self, server: MotoServer, proxy: FaultProxy, rate: float,
                 kinds: list[str]) -> None:
        self.server, self.proxy, self.rate, self.kinds = server, proxy, rate, list(kinds)
        self.checkpoints = S3Checkpoints(server, BUCKET, PREFIX)
        # Nothing of the caller's own AWS set-up (profile, endpoint, retry mode) reaches the job.
        self.env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("AWS_")}
        self.env.update(s3_env(proxy.url, CHAOS_RETRIES))

    @classmethod
    def start(cls, rate: float, kinds: list[str], seed: int) -> S3Lab:
        """Raises MotoMissing when moto is not installed."""
        server = MotoServer.start()
        faults = [RandomFaults(rate, tuple(kinds), seed, SLOW_FAULT_S)] if rate else []
        return cls(server, FaultProxy(server.port, faults, keep_bodies=False).start(), rate,
                   kinds)

    def stop(self) -> None:
        self.proxy.stop()
        self.server.stop()

    def describe(self) -> str:
        return (f"{self.checkpoints.uri} on moto's server ({self.server.url}) behind the fault "
                f"proxy ({self.proxy.url}), {self.rate:.0%} of requests faulted")

    def figures(self) -> dict[str, Any]:
        return {"backend": f"{self.checkpoints.uri} (moto server behind the fault proxy)",
                "fault_rate": self.rate, "fault_kinds": self.kinds,
                "requests": len(self.proxy.requests),
                "requests_by_method": dict(Counter(r.method for r in self.proxy.requests)),
                "faults": self.proxy.injected()}


# ---------------------------------------------------------------------------- summary
def lost_work_bound(chaos: Chaos, a: Attempt, slowest_s: float) -> tuple[int, float]:
    """The most steps a SIGKILL may cost in attempt ``a``, and the save time it assumes.

    The checkpoint a restart resumes from is the newest committed one. Its snapshot was taken
    at most one save interval before the persister took it (the persister always takes the
    newest waiting snapshot), which waited at most one persist; the kill lands before the next
    one commits, at most one persist later. So a SIGKILL loses at most the interval plus two
    saves (snapshot to commit: the slowest this attempt logged; ``slowest_s``, that of the
    attempts without the pause, when it logged none), plus the step in progress. A save held by
    the test's pause lasts at least the pause. While storage fails on purpose a save's length
    is a matter of chance (retries, answers held back), so the slowest of the whole run counts
    (``slowest_s``) when it is longer than this attempt's."""
    save_s = a.slowest_save_s or slowest_s
    if chaos.storage_faults:
        save_s = max(save_s, slowest_s)
    save_s = max(save_s, chaos.pause_in_save if a.paused_saves else 0.0)
    step_s = max(chaos.ref.train_step_s or chaos.ref.step_s, 1e-3)
    return chaos.save_every + 2 * math.ceil(save_s / step_s) + 1, save_s


def summarize(chaos: Chaos, verdict: dict[str, Any], wall_s: float,
              storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures and the verdict; ``storage``: what the storage mode adds (its backend,
    requests and faults injected), merged with what the attempts logged."""
    attempts, ref = chaos.attempts, chaos.ref
    kills = [a for a in attempts if a.kill is not None]
    problems = list(verdict.get("problems", []))
    by_sig = Counter(a.kill.signal for a in kills)
    by_kind = Counter(f"{a.kill.signal} {a.kill.target}" for a in kills)
    moments = Counter(a.kill.moment for a in kills)
    term = [a for a in kills if a.kill.signal == "SIGTERM"]
    term_lost = [a for a in term if a.lost]
    clean = [a for a in term if a.trained and not a.lost]
    sigkill_lost = [a.lost for a in kills if a.kill.signal == "SIGKILL"]
    # One worker SIGKILLed: under DDP the survivors checkpoint the newest step they completed
    # (runtime/exchange.py), so at most the step in flight is lost; under fsdp they cannot
    # (the dead rank's shards are gone) and the save-interval bound below holds.
    worker_kills = [a for a in kills if a.kill.signal == "SIGKILL" and a.kill.target == "worker"]
    job_kills = [a for a in kills if a.kill.signal == "SIGKILL" and a.kill.target != "worker"]
    survivors_save = flag_value(ref.train_args, "--parallel", "ddp") == "ddp"
    # While storage fails on purpose, an emergency checkpoint may fail after its retries; the
    # job says so and exits retryable, and the SIGTERM loses what came after the last commit.
    term_waived = [a.index for a in term_lost if chaos.storage_faults and a.emergency_failed]
    for a in term_lost:
        if a.index not in term_waived:
            problems.append(f"attempt {a.index}: SIGTERM lost {a.lost} completed steps")
    bounds = {}
    waived = []  # SIGKILLs after a failed save: the bound assumes every save commits
    if chaos.save_every:
        slowest = max((a.slowest_save_s for a in attempts if not a.paused_saves), default=0.0)
        for a in kills:
            bound, save_s = lost_work_bound(chaos, a, slowest)
            bounds[a.index] = bound
            if a.kill.signal == "SIGKILL" and a.saves_failed:
                waived.append(a.index)
            elif (a in worker_kills and survivors_save and a.lost > 1
                  and not (chaos.storage_faults and a.survivors_missed)):
                problems.append(f"attempt {a.index}: a worker's SIGKILL lost {a.lost} steps; "
                                "the survivors' checkpoint allows only the step in flight")
            elif a.kill.signal == "SIGKILL" and a.lost > bound:
                problems.append(f"attempt {a.index}: SIGKILL lost {a.lost} steps, more than "
                                f"the bound {bound} (--save-every-steps {chaos.save_every} plus "
                                f"two saves of {save_s:.2f}s at "
                                f"{(ref.train_step_s or ref.step_s) * 1e3:.0f} ms a "
                                "step, plus the step in progress)")
    permanent = sorted({c for a in attempts for c in a.worker_exits if 0 < c < RETRYABLE_FLOOR})
    if permanent:
        problems.append(f"workers exited with permanent codes {permanent} (expected 0 or "
                        "128-255, or a signal)")
    for a in attempts:
        if a.hung:
            problems.append(f"attempt {a.index} hung after its kill")
        if a.strays:
            problems.append(f"attempt {a.index}: {a.strays} processes outlived the launcher")
        if a.kill is None and a.rc != 0 and not chaos.storage_exit(a):
            problems.append(f"attempt {a.index} failed (exit {a.rc}) without a kill")
    finished = bool(attempts) and attempts[-1].kill is None and attempts[-1].rc == 0
    if not finished:
        problems.append("the job never finished")
    if len(kills) < chaos.kills:
        problems.append(f"only {len(kills)} of {chaos.kills} kills landed before the job "
                        "finished; give it more --epochs")
    lost = sum(a.lost for a in attempts)
    exits = Counter(a.rc for a in attempts)
    if storage is not None:
        storage = {**storage, "storage_retries": sum(a.storage_retries for a in attempts),
                   "saves_failed": sum(a.saves_failed for a in attempts),
                   "exits_140": sum(STORAGE_FAILED in a.worker_exits for a in attempts),
                   "restarts_after_140": sum(chaos.storage_exit(a) for a in attempts),
                   "sigkill_bound_waived": waived, "sigterm_loss_waived": term_waived}
    return {
        "nproc": ref.nproc, "parallel": flag_value(ref.train_args, "--parallel", "ddp"),
        "kills_requested": chaos.kills, "kills": len(kills),
        "kills_by_signal": dict(by_sig), "kills_by_kind": dict(by_kind),
        "moments": dict(moments), "restarts": len(attempts) - 1,
        "launcher_exits": {str(k): v for k, v in sorted(exits.items(), key=str)},
        "worker_exits": dict(Counter(c for a in attempts for c in a.worker_exits)),
        "clean_preemptions": len(clean), "sigterm_before_training": len(term) - len(clean)
        - len(term_lost), "steps_lost": lost, "steps_trained": sum(a.trained for a in attempts),
        "total_steps": ref.total_steps, "sigkill_max_lost": max(sigkill_lost, default=0),
        "sigkill_mean_lost": (sum(sigkill_lost) / len(sigkill_lost)) if sigkill_lost else 0.0,
        "sigkill_worker_max_lost": max((a.lost for a in worker_kills), default=0),
        "sigkill_worker_lost": [a.lost for a in worker_kills],
        "sigkill_job_max_lost": max((a.lost for a in job_kills), default=0),
        "survivors_save": survivors_save,
        "sigkill_max_bound": max((bounds[a.index] for a in kills if a.kill.signal == "SIGKILL"),
                                 default=0),
        "storage": storage,
        "weights": verdict.get("weights", "-"), "history": verdict.get("history", "-"),
        "samples": verdict.get("samples", "-"), "problems": problems,
        "result": "FAIL" if problems else "PASS", "wall_s": round(wall_s, 1),
        "reference_wall_s": round(ref.wall_s, 1), "train_args": ref.train_args,
        "attempts": [asdict(a) for a in attempts],
    }


def format_summary(s: dict[str, Any], seed: int) -> str:
    def counts(c: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "-"

    lines = [
        f"chaos summary: {s['nproc']} workers ({s.get('parallel', 'ddp')}), seed {seed}, {s['total_steps']} steps",
        f"  kills        {s['kills']} of {s['kills_requested']}: {counts(s['kills_by_kind'])}",
        f"  moments      {counts(s['moments'])}",
        f"  restarts     {s['restarts']} (launcher exits: {counts(s['launcher_exits'])}; "
        f"worker exits: {counts({str(k): v for k, v in s['worker_exits'].items()})})",
        f"  preemptions  {s['clean_preemptions']} clean SIGTERM stops (emergency checkpoint, "
        f"no step lost), {s['sigterm_before_training']} before training began",
        f"  steps lost   {s['steps_lost']} trained twice ({s['steps_trained']} trained for "
        f"{s['total_steps']}); per SIGKILL max {s['sigkill_max_lost']}, mean "
        f"{s['sigkill_mean_lost']:.1f}; per SIGTERM 0 required",
        f"    one worker SIGKILLed: max {s.get('sigkill_worker_max_lost', '-')} "
        f"{s.get('sigkill_worker_lost', [])} ("
        + ("the step in flight, 1, allowed: the survivors checkpoint"
           if s.get("survivors_save") else
           f"bound up to {s.get('sigkill_max_bound', '-')}: no survivor checkpoint under fsdp")
        + ")",
        f"    whole job SIGKILLed: max {s.get('sigkill_job_max_lost', '-')} (bound up to "
        f"{s.get('sigkill_max_bound', '-')})",
        f"  weights      {s['weights']}",
        f"  history      {s['history']}",
        f"  samples      {s['samples']}",
        f"  wall time    {s['wall_s']:.0f}s (uninterrupted reference {s['reference_wall_s']:.0f}s)",
    ]
    if st := s.get("storage"):
        waived = st["sigkill_bound_waived"]
        lines[1:1] = [
            f"  storage      {st['backend']}; {st['fault_rate']:.0%} of its requests faulted "
            f"({', '.join(st['fault_kinds'])})",
            f"  requests     {st['requests']} ({counts(st['requests_by_method'])}); faults "
            f"injected {sum(st['faults'].values())}: {counts(st['faults'])}",
            f"  storage logs {st['storage_retries']} calls retried, {st['saves_failed']} saves "
            f"failed (SAVE FAILED), {st['exits_140']} attempts with a worker exit 140, "
            f"{st['restarts_after_140']} restarted after 140 alone"
            + (f"; lost-work bound waived after a failed save in attempts {waived}"
               if waived else "")
            + (f"; SIGTERM losses allowed after a failed emergency checkpoint in attempts "
               f"{st['sigterm_loss_waived']}" if st["sigterm_loss_waived"] else ""),
        ]
    lines += [f"  problem      {p}" for p in s["problems"]]
    lines.append(f"  result       {s['result']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def _csv(choices) -> Any:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="workers (torchrun --nproc_per_node)")
    p.add_argument("--kills", type=int, default=5, help="kills before the job may finish")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan (not training)")
    p.add_argument("--workdir", default="runs/chaos", help="reference/, chaos/, summary.json")
    p.add_argument("--reference", default="",
                   help="folder of the uninterrupted run (default WORKDIR/reference); reused "
                        "when its command is the same")
    p.add_argument("--signals", type=_csv(tuple(SIGNALS)), default=list(SIGNALS),
                   help="comma-separated: SIGKILL,SIGTERM")
    p.add_argument("--targets", type=_csv(TARGETS), default=list(TARGETS),
                   help="comma-separated: worker,launcher")
    p.add_argument("--pause-in-save", type=float, default=0.5,
                   help="seconds a save stays half-written in attempts that aim inside one")
    p.add_argument("--attempt-timeout", type=float, default=900.0,
                   help="seconds an attempt may run before it counts as hung")
    p.add_argument("--storage", choices=("local", "s3"), default="local",
                   help="where the attempts write checkpoints: a local folder, or S3 (moto's "
                        "server, started here, behind the fault proxy; needs "
                        f"{INSTALL_HINT})")
    p.add_argument("--storage-faults", type=float, default=0.0, metavar="SHARE",
                   help="with --storage s3: the share of the attempts' storage requests that "
                        "fail (or are held back), e.g. 0.1; drawn from --seed")
    p.add_argument("--storage-fault-kinds", type=_csv(ACTIONS), default=list(ACTIONS),
                   help="comma-separated, drawn equally: " + ",".join(ACTIONS))
    p.add_argument("--task", default="",
                   help="the task to train, an import string (default: the built-in job); its "
                        "epochs should be about 32 steps, or give --epochs after --")
    p.add_argument("--task-args", default="", help="the task's arguments as JSON")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="how the job trains: ddp (default), or fsdp (FSDP2, sharded "
                        "checkpoints); the same as --parallel after --")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: extra flags for src.train (default: "
                        + " ".join(DEFAULT_TRAIN_ARGS) + ", --epochs sized to the kills)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.task:
        extra = ["--task", args.task, *(["--task-args", args.task_args] if args.task_args
                                        else []), *extra]
    if args.parallel != "ddp":  # ddp adds no flag: its command (and reference) stays as before
        extra = ["--parallel", args.parallel, *extra]
    if args.nproc < 1 or args.kills < 0:
        print("error: --nproc must be >= 1 and --kills >= 0", file=sys.stderr)
        return 2
    if not 0.0 <= args.storage_faults <= 1.0 or (args.storage_faults and args.storage != "s3"):
        print("error: --storage-faults takes a share from 0 to 1, with --storage s3",
              file=sys.stderr)
        return 2
    try:
        lab = S3Lab.start(args.storage_faults, args.storage_fault_kinds, args.seed) \
            if args.storage == "s3" else None
    except MotoMissing as e:
        print(f"error: --storage s3: {e}", file=sys.stderr)
        return 2
    # Stopped by SIGTERM or Ctrl-C (even from a background shell, which ignores SIGINT), the
    # tool unwinds and kills the job it is running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run(args, extra, lab)
    finally:
        if lab is not None:
            lab.stop()


def _run(args: argparse.Namespace, extra: list[str], lab: S3Lab | None) -> int:
    workdir = Path(args.workdir).resolve()
    train_args = effective_train_args(extra, args.kills)
    t0 = time.monotonic()
    print(f"reference: {args.nproc} workers, src.train {' '.join(train_args)}", flush=True)
    ref = ensure_reference(Path(args.reference).resolve() if args.reference
                           else workdir / "reference", args.nproc, train_args)
    print(f"reference: {ref.total_steps} steps, {ref.wall_s:.1f}s (start-up {ref.startup_s:.1f}s)"
          f" in {ref.folder}", flush=True)
    chaos = Chaos(ref, workdir / "chaos", args.kills, args.seed, args.signals, args.targets,
                  args.pause_in_save, args.attempt_timeout,
                  log=lambda line: print(line, flush=True),
                  checkpoints=lab.checkpoints if lab else None, env=lab.env if lab else None,
                  storage_faults=bool(lab and lab.rate))
    if lab is not None:
        print(f"storage: {lab.describe()}", flush=True)
    attempts = chaos.run()
    checkpoints = chaos.checkpoints
    verdict = compare_runs(ref, checkpoints.uri, [chaos.folder / f"attempt_{a.index:03d}" /
                                                  "trace" for a in attempts], checkpoints.options)
    summary = summarize(chaos, verdict, time.monotonic() - t0,
                        lab.figures() if lab else None)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_summary(summary, args.seed), flush=True)
    return 0 if summary["result"] == "PASS" else 1

