"""Run the real commands as subprocesses (training under torchrun or alone, ftrain-run, the
ckpt tool), and find, signal and wait for the processes they leave (from /proc; no psutil)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# Small, fast defaults for test runs (32 global batches of 64 per epoch).
SMALL = ["--synthetic-train-size", "2048", "--synthetic-test-size", "512", "--batch-size", "64",
         "--epochs", "2", "--log-every-steps", "0", "--save-every-seconds", "0"]

# The training flags tests/system/test_chaos.py gives `launch.chaos --kills 4 --parallel fsdp
# --`: with them its uninterrupted reference is the same run as the CNN reference of
# tests/integration/test_fsdp.py (SMALL, --parallel fsdp, a checkpoint every 5 steps), so the two
# share it.
FSDP_CHAOS_EXTRA = ["--synthetic-test-size", "512", "--save-every-steps", "5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTT_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    extra = dict(extra or {})
    # A PYTHONPATH in ``extra`` (a sitecustomize of the harness) goes first, the checkout after.
    front = [extra.pop("PYTHONPATH")] if extra.get("PYTHONPATH") else []
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([*front, str(ROOT), str(ROOT / "src")])})
    env.update(extra)
    return env


def train_cmd(args: list[str], nproc: int = 0, torchrun_args: list[str] | None = None) -> list[str]:
    """``nproc`` 0: plain ``python -m src.train``; else torchrun with that many workers."""
    if nproc == 0:
        return [PY, "-m", "src.train", *args]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            *(torchrun_args or []), "-m", "src.train", *args]


def run_train(args: list[str], nproc: int = 0, timeout: float = 300, env: dict | None = None,
              torchrun_args: list[str] | None = None, cwd: Path | None = None
              ) -> subprocess.CompletedProcess:
    """Run the training command to its end. Past ``timeout`` every worker is asked for its
    threads' Python stacks (SIGUSR1: faulthandler), then everything is killed and the test
    fails with the stacks: a hang in CI leaves more than a timeout behind."""
    cmd = train_cmd(args, nproc, torchrun_args)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=base_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = descendants(proc.pid)
        for pid in tree if nproc else [proc.pid]:  # the workers, not torchrun
            _signal(pid, signal.SIGUSR1)
            time.sleep(0.5)  # one at a time: they share the stderr pipe
        for pid in [proc.pid, *tree]:
            _signal(pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running after {timeout:.0f}s, killed: {' '.join(cmd)}\n"
                             f"its stderr, ending with every worker's stacks:\n"
                             f"{err[-60000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rank_then_exit_now(body, *args) -> None:
    """A spawned test rank: ``body(*args)``, then the exit our commands take
    (``exitcodes.exit_now``), not the interpreter's teardown.

    Why: after ``destroy_process_group`` a gloo run-loop thread can still hold the last
    reference to a finished collective's work (an FSDP model's device mesh keeps the group
    alive). If the interpreter is already finalizing when that thread drops it, the decref
    cannot take the GIL, the thread is unwound, and libstdc++ aborts the process
    ("terminate called without an active exception", exit -6) after all its work is done.
    Seen about 1 run in 15 on 2 busy cores (a gdb backtrace shows ProcessGroupGloo::runLoop
    in ~AsyncAllgatherCoalescedWork -> take_gil -> pthread_exit). Our commands never finalize
    (train, ckpt and predict end in exit_now); an exception in ``body`` still exits 1."""
    from ftrain.runtime.exitcodes import exit_now

    body(*args)
    exit_now(0)


def launch_run_cmd(train_args: list[str], nproc: int,
                   torchrun_args: list[str] | None = None) -> list[str]:
    """The container entry point (ftrain-run) around torchrun around ``src.train``."""
    return [PY, "-m", "ftrain.launcher", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *(torchrun_args or []), "-m",
            "src.train", *train_args]


def start_logged(cmd: list[str], log_path: Path | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own (so that its whole group can be killed), stdout
    and stderr to ``log_path`` (default: nowhere)."""
    with open(log_path or os.devnull, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=base_env(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def start_train(args: list[str], nproc: int = 0, env: dict | None = None,
                torchrun_args: list[str] | None = None, log_path: Path | None = None
                ) -> subprocess.Popen:
    """The training command of ``train_cmd``, started as ``start_logged`` starts one."""
    return start_logged(train_cmd(args, nproc, torchrun_args), log_path, env)


def ckpt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "src.ckpt", *args], cwd=ROOT, env=base_env(env),
                          capture_output=True, text=True, timeout=120)


def inspect(uri: str, env: dict | None = None) -> dict:
    r = ckpt("inspect", uri, "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def export_weights(uri: str, out: Path, env: dict | None = None) -> dict[str, torch.Tensor]:
    r = ckpt("export", uri, str(out), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(out, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- /proc
def proc_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, pgid, state) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), fields[0]


def processes_matching(text: str) -> dict[int, int]:
    """Live (not zombie) processes whose command line contains ``text`` (a checkpoint folder,
    a test's tmp_path, a chaos launch's trace folder): pid -> ppid."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmd:
            stat = proc_stat(int(entry.name))
            if stat is not None and stat[2] != "Z":
                out[int(entry.name)] = stat[0]
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, children before their children."""
    out, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children(parent)]
        out += frontier
    return out


def rank_of(pid: int) -> int | None:
    """The RANK a worker process was started with, None when it has none (or is gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


# ---------------------------------------------------------------------------- signals, waits
def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def kill_all(pids: list[int], sig: int) -> None:
    """Signal every process group the processes lead or belong to, then each process."""
    groups = {stat[1] for pid in pids if (stat := proc_stat(pid)) is not None}
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        _signal(pid, sig)


def kill_leftovers(text: str) -> None:
    """SIGKILL, by pid, every process still running whose command line holds ``text`` (a
    test's tmp_path): workers live in sessions of their own and outlive a killed launcher."""
    for pid in processes_matching(text):
        _signal(pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, interval: float = 0.1, while_=lambda: True) -> bool:
    """True as soon as ``predicate()`` is; False after ``timeout`` or once ``while_()`` is not."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if not while_():
            return False
        time.sleep(interval)
    return False


def wait_gone(text: str, timeout: float = 90) -> bool:
    """Wait until no process mentions ``text``: torchrun workers live in sessions of their own
    and outlive a kill of torchrun by the time their emergency checkpoint takes."""
    return wait_for(lambda: not processes_matching(text), timeout, interval=0.2)
