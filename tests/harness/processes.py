"""Shared helpers for the tests: run the real commands as subprocesses."""

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

# The training flags tests/test_chaos.py gives `launch.chaos --kills 4 --parallel fsdp --`: with
# them its uninterrupted reference is the same run as tests/test_fsdp.py's CNN reference
# (SMALL, --parallel fsdp, a checkpoint every 5 steps), so the two share it.
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


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; no psutil)."""
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


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_train(args: list[str], nproc: int = 0, env: dict | None = None,
                torchrun_args: list[str] | None = None, log_path: Path | None = None
                ) -> subprocess.Popen:
    """Start in its own process group (so the whole group can be killed), output to a file."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(train_cmd(args, nproc, torchrun_args), cwd=ROOT, env=base_env(env),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def committed_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in Path(ckpt_dir).glob("step_*/manifest.json"))


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


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max abs diff {(a[k].double() - b[k].double()).abs().max()})"


def strip_timing(history: list[dict]) -> list[dict]:
    """The metric history without wall-clock fields (those legitimately differ)."""
    return [{k: v for k, v in h.items() if k not in ("samples_per_s", "seconds", "saves_dropped")}
            for h in history]


def processes_matching(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text`` (e.g. a checkpoint dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().split(") ", 1)[1][:1]
        except OSError:
            continue
        if text in cmd and state != "Z":
            pids.append(int(p.name))
    return pids


def wait_gone(text: str, timeout: float = 90) -> bool:
    """Wait until no process mentions ``text``: torchrun workers live in sessions of their own
    and outlive a kill of torchrun by the time their emergency checkpoint takes."""
    return wait_for(lambda: not processes_matching(text), timeout, interval=0.2)


def cut_and_resume(args: list[str], tmp_path: Path, cut_at: int, nproc: int = 2,
                   ref_args: tuple[str, ...] = (), resume_args: tuple[str, ...] = ()):
    """Train ``args`` uninterrupted into ``tmp_path/ref``; train them again into
    ``tmp_path/cut`` stopped at step ``cut_at``, then rerun the same command. Asserts that every
    run succeeded, that the rerun resumed, and that both end with bitwise-equal weights.
    Returns (the reference's newest checkpoint, the resumed run's, the rerun's stderr)."""
    from ftrain.checkpoint import load_uri

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for folder, extra in ((ref, [*ref_args]), (cut, ["--max-steps", str(cut_at)]),
                          (cut, [*resume_args])):
        r = run_train([*args, *extra, "--checkpoint-dir", str(folder)], nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr, r.stderr[-3000:]
    a, b = load_uri(str(ref)), load_uri(str(cut))
    assert_bitwise_equal(a.model_state(), b.model_state())
    return a, b, r.stderr


def _exception_texts(exc: BaseException) -> list[str]:
    """str, repr and the formatted traceback of ``exc`` and of every exception in its
    cause/context chain (what a log line or a crash report could show)."""
    import traceback

    out, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out += [str(e), repr(e), *(repr(a) for a in e.args)]
        e = e.__cause__ or e.__context__
    out.append("".join(traceback.format_exception(exc)))
    return out


def assert_secret_absent(secret: str, texts=(), paths=(), blobs=None, exceptions=()) -> int:
    """Fail if ``secret`` appears anywhere it must not: in ``texts`` (log output, messages), in
    any file below ``paths`` (files, or folders walked recursively; read as bytes, so binary
    files such as checkpoints and event files count), in ``blobs`` ({name: bytes}, e.g. the
    objects of a bucket) or in the text of ``exceptions`` (with their cause chains).

    The secret is also looked for as it would appear JSON-escaped and percent-encoded. Returns
    how many texts, files, blobs and exceptions were searched, so that a caller can check it
    searched what it meant to."""
    import urllib.parse

    assert secret, "an empty secret is found everywhere"
    forms = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""),
             urllib.parse.quote_plus(secret)}
    needles = [f.encode() for f in forms]
    searched = 0

    def check(where: str, data: bytes) -> None:
        for needle in needles:
            assert needle not in data, f"secret found in {where}"

    for i, text in enumerate(texts):
        check(f"text #{i} ({text[:80]!r}...)", text.encode(errors="surrogateescape"))
        searched += 1
    for root in paths:
        root = Path(root)
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            check(f"file {path}", path.read_bytes())
            searched += 1
    for name, data in (blobs or {}).items():
        check(f"blob {name}", bytes(data))
        searched += 1
    for exc in exceptions:
        for text in _exception_texts(exc):
            check(f"exception {type(exc).__name__}: {text[:200]!r}", text.encode(
                errors="surrogateescape"))
        searched += 1
    return searched
