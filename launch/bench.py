"""The PERFORMANCE.md measures, each against its reference measured in the same run.

    python -m launch.bench [--quick] [--out docs/benchmarks.md]
    python -m launch.bench --device cuda --repeats 2 --out docs/development/benchmarks-gpu.md

P1  default job throughput (one process, epoch 2)      vs a plain loop, same model/data/batch
    (on a GPU: vs a plain DataLoader loop, and P9 vs a plain loop over data on the GPU)
P2  throughput with saves every 50 / every 4 steps      vs the same run without saves
    ... and with storage slower than the cadence        (FTT_TEST_PAUSE_IN_SAVE=1: 1 s a save)
P3  stall per save                                      vs the snapshot floor
P4  stall per save                                      vs a synchronous torch.save + fsync
P5  background persist                                  vs raw write + fsync of the same bytes
P6  SIGKILL of a 2-worker job -> first step after the restart, minus the launcher floor (a
    trivial torchrun script's start-up + process group), vs 2 s + the checkpoint load
P7  verified load                                       vs raw read of the same bytes
P8  steps lost per SIGTERM / per SIGKILL in a short chaos run vs 0 / max(save interval, persist)
S1  extra wall time per save of a real run (a run with saves every 10 steps minus one without,
    MLP 4096x4, 409 MiB of state)                     vs a synchronous torch.save + fsync
S2  the persist time the run logs                      vs raw write + fsync of the same bytes

P1 and P2 are medians of 3 interleaved runs (--quick: 1). It prints a table (measure, ours,
reference, ratio, target, pass) and writes it as Markdown,
with the machine it ran on, into --out. Not part of the test run: a benchmark measures, a test
asserts; nothing here is timed against a fixed number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.stores import PAUSE_ENV, slow_store_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTT_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    env.update(extra or {})
    if env.get(PAUSE_ENV):  # storage slower than the saves: the harness's slow store
        env = slow_store_env(float(env[PAUSE_ENV]), env)
    return env


def _train(args: list[str], env: dict[str, str] | None = None, nproc: int = 0) -> str:
    cmd = [PY, "-m", "ftrain.train", *args] if not nproc else [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "ftrain.train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(env), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r.stderr


def _epoch_rate(log: str, epoch: int) -> float:
    m = re.search(rf"epoch {epoch}/\d+ done: .*\| ([0-9.]+) samples/s", log)
    if not m:
        raise RuntimeError(f"no epoch {epoch} line in the log:\n{log[-2000:]}")
    return float(m.group(1))


# ---------------------------------------------------------------------------- P1, P2
def plain_loop_rate(train_size: int, batch: int, seed: int = 0, device: str = "cpu",
                    feed: str = "indexed", workers: int = 0) -> float:
    """A plain loop: the same CNN, synthetic data and batch, SGD with momentum; samples/s over
    its second epoch. ``feed``: "indexed" gathers each batch from the tensors on ``device``
    (moved there once); "loader" is a DataLoader over the CPU tensors (shuffled, pinned on a
    GPU, ``workers`` processes), each batch copied to the device."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ftrain.tasks.builtin.datasets import make_synthetic
    from ftrain.tasks.builtin.models import SmallCNN

    dev = torch.device(device)
    train, _ = make_synthetic(seed, train_size, 128)
    torch.manual_seed(seed)
    model = SmallCNN().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    steps = train_size // batch
    x, y = train.x.to(dev), train.y.to(dev)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, pin_memory=dev.type == "cuda",
                        persistent_workers=workers > 0) if feed == "loader" else None

    def batches():
        if loader is not None:
            for xb, yb in loader:
                yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            return
        order = torch.randperm(train_size, device=dev)
        for b in range(steps):
            idx = order[b * batch:(b + 1) * batch]
            yield x[idx], y[idx]

    rate = 0.0
    for _epoch in range(2):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for xb, yb in batches():
            loss = loss_fn(model(xb), yb) / batch
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rate = steps * batch / (time.perf_counter() - t0)
    return rate


def p1(work: Path, quick: bool, device: str = "cpu", repeats: int = 3) -> list[tuple]:
    if device == "cuda":
        return p1_gpu(work, quick, repeats, device)
    n = 4096 if quick else 12288
    common = ["--epochs", "2", "--synthetic-train-size", str(n), "--log-every-steps", "0",
              "--save-every-seconds", "0"]
    ours_runs, ref_runs = [], []
    for rep in range(repeats):  # interleaved: the machine's noise hits both alike
        ours_runs.append(_epoch_rate(_train([*common, "--checkpoint-dir",
                                             str(work / f"p1-{rep}")]), 2))
        ref_runs.append(plain_loop_rate(n, 256))
    ours, ref = statistics.median(ours_runs), statistics.median(ref_runs)
    return [("P1", "default job samples/s / plain loop (1 process, epoch 2)", ours, ref,
             ours / ref, ">= 0.97", ours / ref >= 0.97)]


def p1_gpu(work: Path, quick: bool, repeats: int, device: str = "cuda") -> list[tuple]:
    """On a GPU: the default job (data on the device, automatic) against a plain loop fed by a
    DataLoader (P1) and against a plain loop over data already on the GPU (P9); and the job
    with its DataLoader (``--data-on-device off``, 0 and 2 workers) against the plain
    DataLoader loop with the same workers."""
    n = 16384 if quick else 65536
    common = ["--epochs", "2", "--synthetic-train-size", str(n), "--log-every-steps", "0",
              "--save-every-seconds", "0", "--device", device]
    ours = {"auto": [], "off0": [], "off2": []}
    refs = {"loader0": [], "loader2": [], "indexed": []}
    flags = {"auto": [], "off0": ["--data-on-device", "off"],
             "off2": ["--data-on-device", "off", "--num-workers", "2"]}
    for rep in range(repeats):  # interleaved: the machine's noise hits all alike
        for key, extra in flags.items():
            ours[key].append(_epoch_rate(_train([*common, *extra, "--checkpoint-dir",
                                                 str(work / f"p1-{key}-{rep}")]), 2))
        refs["loader0"].append(plain_loop_rate(n, 256, device=device, feed="loader"))
        refs["loader2"].append(plain_loop_rate(n, 256, device=device, feed="loader", workers=2))
        refs["indexed"].append(plain_loop_rate(n, 256, device=device, feed="indexed"))
    o = {k: statistics.median(v) for k, v in ours.items()}
    r = {k: statistics.median(v) for k, v in refs.items()}

    def row(tag, what, a, b, target):
        return (tag, what, a, b, a / b, f">= {target}", a / b >= target)

    return [row("P1", "default job samples/s / plain DataLoader loop (1 process, epoch 2)",
                o["auto"], r["loader0"], 0.97),
            row("P9", "default job samples/s / plain loop over data on the GPU",
                o["auto"], r["indexed"], 0.90),
            row("P1", "--data-on-device off, 0 workers / plain DataLoader loop, 0 workers",
                o["off0"], r["loader0"], 0.97),
            row("P1", "--data-on-device off, 2 workers / plain DataLoader loop, 2 workers",
                o["off2"], r["loader2"], 0.97)]


def p2(work: Path, quick: bool, device: str = "cpu", repeats: int = 3) -> list[tuple]:
    if device == "cuda":  # the GPU case: MLP 4096x4, 409 MiB of state with momentum
        n, width, batch, size = (16384 if quick else 65536), "4096", "256", "409 MiB"
    else:
        n, width, batch, size = (4096 if quick else 16384), "1024", "32", "26 MiB"
    # Epoch 2 is measured: the host buffers of the snapshots exist by then (steady state).
    common = ["--model", "mlp", "--width", width, "--depth", "4", "--epochs", "2",
              "--synthetic-train-size", str(n), "--synthetic-test-size", "256",
              "--batch-size", batch, "--log-every-steps", "0", "--save-every-seconds", "0",
              "--keep-last", "2", "--device", device]
    runs = {"none": ([], {}), "4": (["--save-every-steps", "4"], {}),
            "50": (["--save-every-steps", "50"], {}),
            "slow": (["--save-every-steps", "4"], {PAUSE_ENV: "1"})}
    if device == "cuda":  # 409 MiB every 4 steps is already far faster than the disk
        del runs["slow"]
    rates: dict[str, list[float]] = {k: [] for k in ("none", "4", "50", "slow")}
    for rep in range(repeats):  # interleaved: the machine's noise hits all alike
        for key, (extra, env) in runs.items():
            folder = work / f"p2-{key}-{rep}"
            rates[key].append(_epoch_rate(_train([*common, *extra, "--checkpoint-dir",
                                                  str(folder)], env=env), 2))
    none, saves, some = (statistics.median(rates[k]) for k in ("none", "4", "50"))
    rows = [("P2", f"samples/s with saves every 50 steps / without (MLP {width}x4, {size})",
             some, none, some / none, ">= 0.97", some / none >= 0.97),
            ("P2", "same, saves every 4 steps (faster than storage takes them)", saves, none,
             saves / none, ">= 0.97", saves / none >= 0.97)]
    if rates["slow"]:
        slow = statistics.median(rates["slow"])
        rows.append(("P2", "same, storage taking 1 s per save (slower than the cadence)", slow,
                     none, slow / none, ">= 0.97", slow / none >= 0.97))
    return rows


def tiny(work: Path, quick: bool, device: str = "cpu", repeats: int = 3) -> list[tuple]:
    """The loop's own cost per step: an MLP 16-32-4 (676 parameters, batch 64, one process)
    through the command line, against the plain loop over the same model, data, optimizer and
    schedule computing the same metric sums (the task's own loss), each in a fresh process;
    samples/s over epoch 2. T1: the data gathered on the device, T2: through the job's
    DataLoader (``--data-on-device off``) against a plain DataLoader loop over the tensors."""
    n = 16384 if quick else 65536
    args = ["--task", "launch.bench_tasks:TinyMLP", "--task-args", json.dumps({"size": n}),
            "--batch-size", "64", "--epochs", "2", "--log-every-steps", "0",
            "--save-every-seconds", "0", "--device", device]
    rows = []
    for tag, feed, on_device, what in (
            ("T1", "indexed", "auto", "data on the device"),
            ("T2", "loader", "off", "through a DataLoader, 0 workers")):
        plain = (f"from launch.bench_tasks import tiny_plain_rate; "
                 f"print(tiny_plain_rate({n}, device={device!r}, feed={feed!r}))")
        ours_runs, ref_runs = [], []
        for rep in range(repeats):  # interleaved: the machine's noise hits both alike
            ours_runs.append(_epoch_rate(_train([*args, "--data-on-device", on_device,
                                                 "--checkpoint-dir",
                                                 str(work / f"tiny-{tag}-{rep}")]), 2))
            r = subprocess.run([PY, "-c", plain], cwd=ROOT, env=_env(), capture_output=True,
                               text=True, timeout=600, check=True)
            ref_runs.append(float(r.stdout.split()[-1]))
        ours, ref = statistics.median(ours_runs), statistics.median(ref_runs)
        rows.append((tag, f"tiny MLP samples/s / plain loop (1 process, {what}, epoch 2)",
                     ours, ref, ours / ref, ">= 0.95", ours / ref >= 0.95))
    return rows


def save_cost(work: Path, quick: bool, device: str = "cpu", repeats: int = 3) -> list[tuple]:
    """The cost of a save as a user meets it, measured from outside: the wall time of a run with
    a save every 10 steps minus that of the same run without (both save at the epoch's end),
    per save (S1), against a synchronous ``torch.save`` + fsync of the same state; and the
    persist time the run logs (snapshot to commit) against a raw write + fsync of the same
    bytes (S2). MLP 4096x4, batch 32: 409 MiB of state with SGD's momentum."""
    every, steps = 10, (40 if quick else 100)
    common = ["--model", "mlp", "--width", "4096", "--depth", "4", "--epochs", "1",
              "--synthetic-train-size", str(steps * 32), "--synthetic-test-size", "64",
              "--batch-size", "32", "--log-every-steps", "0", "--save-every-seconds", "0",
              "--keep-last", "2", "--device", device]
    walls: dict[str, list[float]] = {"none": [], "saves": []}
    persists: list[float] = []
    saves = steps // every - 1  # the last one is the epoch end's, which both runs write
    for rep in range(repeats):  # interleaved: the machine's noise hits both alike
        for key, every_steps in (("none", 0), ("saves", every)):
            folder = work / f"save-{key}-{rep}"
            t0 = time.perf_counter()
            log = _train([*common, "--save-every-steps", str(every_steps),
                          "--checkpoint-dir", str(folder)])
            walls[key].append(time.perf_counter() - t0)
            commits = [float(s) for s in re.findall(r"committed \([0-9.]+ MiB, ([0-9.]+)s\)",
                                                    log)]
            if len(commits) != (saves + 1 if every_steps else 1):
                raise RuntimeError(f"expected {saves + 1 if every_steps else 1} commits, the "
                                   f"run logged {len(commits)}:\n{log[-3000:]}")
            if every_steps:
                persists += commits[:-1]  # not the epoch end's: nothing trains beside it
            if rep < repeats - 1 or key == "none":
                shutil.rmtree(folder, ignore_errors=True)
    newest = max((work / f"save-saves-{repeats - 1}").glob("step_*"))
    r = subprocess.run([PY, "-m", "launch.bench_checkpoint", "--references", str(newest),
                        "--repeats", "3", "--dir", str(work / "save-refs")], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=900, check=True)
    refs = json.loads(r.stdout.strip().splitlines()[-1])
    extra = (statistics.median(walls["saves"]) - statistics.median(walls["none"])) / saves
    print(f"  S1 runs' wall times (s), interleaved: without saves "
          f"{[round(w, 2) for w in walls['none']]}, with {saves} more saves "
          f"{[round(w, 2) for w in walls['saves']]}", flush=True)
    persist = statistics.median(persists)
    mib = refs["mib"]
    return [("S1", f"extra wall time per save in a run (s; MLP 4096x4, {mib:.0f} MiB, a save "
                   f"every {every} steps) / sync torch.save+fsync", extra, refs["sync_save_s"],
             extra / refs["sync_save_s"], "<= 0.3", extra / refs["sync_save_s"] <= 0.3),
            ("S2", "raw write+fsync of the state's bytes / the persist the run logs (s; a "
                   "throughput ratio)", refs["raw_write_s"], persist,
             refs["raw_write_s"] / persist, ">= 0.8", refs["raw_write_s"] / persist >= 0.8)]


# ---------------------------------------------------------------------------- P3-P5, P7
def checkpoint_measures(work: Path, quick: bool, device: str = "cpu",
                        repeats: int = 3) -> list[tuple]:
    mib = "1966" if device == "cuda" else ("128" if quick else "384")  # the GPU size
    r = subprocess.run([PY, "-m", "launch.bench_checkpoint", "--mib", mib, "--device", device,
                        "--repeats", str(max(repeats, 2) if device == "cuda" else
                                         3 if quick else 5), "--dir", str(work / "ckpt")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    rows = []
    for line in r.stdout.splitlines():
        m = re.match(r"(P\d)\s+(.+?)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(<=|>=) ([0-9.]+)$",
                     line)
        if m:
            tag, what, ours, ref, ratio, op, target = m.groups()
            ok = float(ratio) <= float(target) if op == "<=" else float(ratio) >= float(target)
            rows.append((tag, what, float(ours), float(ref), float(ratio), f"{op} {target}", ok))
    return rows


# ---------------------------------------------------------------------------- P6
FLOOR_SCRIPT = ("import torch.distributed as dist; dist.init_process_group('gloo'); "
                "dist.barrier(); dist.destroy_process_group()")


def launcher_floor(work: Path) -> float:
    script = work / "floor.py"
    script.write_text(FLOOR_SCRIPT + "\n")
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], cwd=ROOT, env=_env(), capture_output=True, timeout=300,
                   check=True)
    return time.perf_counter() - t0


def p6(work: Path, quick: bool) -> list[tuple]:
    ckpt, trace = work / "p6", work / "p6trace"
    args = ["--synthetic-train-size", "4096", "--batch-size", "64", "--epochs", "3",
            "--save-every-steps", "5", "--save-every-seconds", "0", "--log-every-steps", "0",
            "--checkpoint-dir", str(ckpt), "--trace-samples", str(trace)]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "ftrain.train", *args]

    def steps() -> int:
        n = 0
        for f in trace.glob("rank0-*.jsonl") if trace.exists() else []:
            n += sum(1 for _ in f.open())
        return n

    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while steps() < 12 and proc.poll() is None:
        time.sleep(0.05)
    done_before = steps()
    t_kill = time.perf_counter()
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in _pids_with(str(ckpt)):  # torchrun's workers live in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while _pids_with(str(ckpt)):
        time.sleep(0.05)
    log = work / "p6.log"
    with log.open("w") as out:
        again = subprocess.Popen(cmd, cwd=ROOT, env=_env({"FTT_LOG_LEVEL": "INFO"}),
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while steps() <= done_before and again.poll() is None:
        time.sleep(0.02)
    recovery = time.perf_counter() - t_kill
    os.killpg(again.pid, signal.SIGKILL)
    for pid in _pids_with(str(ckpt)):
        os.kill(pid, signal.SIGKILL)
    again.wait()
    floor = launcher_floor(work)
    from ftrain.checkpoint import load_uri

    t0 = time.perf_counter()
    load_uri(str(ckpt))
    load = time.perf_counter() - t0
    ours = recovery - floor
    rows = [("P6", "SIGKILL of the whole job -> first step after the rerun, minus the launcher "
             f"floor ({floor:.2f} s)", ours, 2.0 + load, ours / (2.0 + load), "<= 1.0",
             ours <= 2.0 + load)]
    from launch import bench_recovery

    for what, measure in (("one worker SIGKILLed, torchrun --max-restarts",
                           bench_recovery.worker_kill),
                          ("a node lost (two agents, one SIGKILLed with its worker)",
                           bench_recovery.node_kill)):
        seconds, lost = measure(work, PY, ROOT, _env())
        ours = seconds - floor
        rows.append(("P6", f"{what} -> first step after the restart, minus the floor; "
                     f"{lost} step(s) lost", ours, 2.0 + load, ours / (2.0 + load), "<= 1.0",
                     ours <= 2.0 + load))
    return rows


def _pids_with(text: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


# ---------------------------------------------------------------------------- P8
def p8(work: Path, quick: bool) -> list[tuple]:
    r = subprocess.run([PY, "-m", "launch.chaos", "--nproc", "2", "--kills", "4" if quick else "8",
                        "--seed", "5", "--workdir", str(work / "chaos")], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=3600)
    summary = json.loads((work / "chaos" / "summary.json").read_text())
    attempts = [a for a in summary["attempts"] if a["kill"]]
    term = [a["lost"] for a in attempts if a["kill"]["signal"] == "SIGTERM"]
    kill = [a["lost"] for a in attempts if a["kill"]["signal"] == "SIGKILL"]
    interval = 3  # launch.chaos's --save-every-steps
    rows = [("P8", f"steps lost per SIGTERM (max of {len(term)})", max(term, default=0), 0,
             float("nan"), "== 0", max(term, default=0) == 0),
            ("P8", f"steps lost per SIGKILL (max of {len(kill)}; chaos {summary['result']})",
             max(kill, default=0), interval, max(kill, default=0) / interval,
             "<= 1 save interval (+1 persist)", max(kill, default=0) <= 2 * interval)]
    if r.returncode != 0:
        print(r.stdout[-2000:], file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------- report
def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, torch "
            f"{torch.__version__}" + (f", {torch.cuda.get_device_name()}" if
                                      torch.cuda.is_available() else ", no GPU"))


def markdown(rows: list[tuple], when: str) -> str:
    lines = [f"Measured {when} on {machine()} by `python -m launch.bench`.", "",
             "| measure | what | ours | reference | ratio | target | pass |",
             "|---|---|---|---|---|---|---|"]
    for tag, what, ours, ref, ratio, target, ok in rows:
        r = "-" if ratio != ratio else f"{ratio:.2f}"  # NaN: no ratio
        lines.append(f"| {tag} | {what} | {ours:.4g} | {ref:.4g} | {r} | {target} | "
                     f"{'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs (a few minutes)")
    p.add_argument("--only", default="", help="comma-separated subset: p1,p2,tiny,save,ckpt,p6,p8")
    p.add_argument("--out", default="", help="write the Markdown table here (after each part)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the jobs train: cuda measures P1/P9, P2 and P3-P7 on the GPU "
                        "(P6 and P8 measure the CPU launcher: not with cuda)")
    p.add_argument("--repeats", type=int, default=0,
                   help="interleaved runs per P1/P2 figure, the median taken (default 3, "
                        "--quick 1)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    parts = {"p1": p1, "p2": p2, "tiny": tiny, "save": save_cost, "ckpt": checkpoint_measures,
             "p6": p6, "p8": p8}
    gpu_parts = ("ckpt", "p1", "p2", "tiny", "save")
    chosen = [x.strip().lower() for x in args.only.split(",") if x.strip()] or (
        list(gpu_parts) if args.device == "cuda" else list(parts))
    unknown = [x for x in chosen if x not in parts]
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here; run without --device")
        cpu_only = [x for x in chosen if x not in gpu_parts]
        if cpu_only:
            p.error(f"--only {','.join(cpu_only)}: measured on the CPU launcher, not with "
                    f"--device cuda; run them without --device")
    work = Path(tempfile.mkdtemp(prefix="ftrain-bench-"))
    rows: list[tuple] = []
    when = time.strftime("%Y-%m-%d")
    try:
        for name in chosen:
            t0 = time.perf_counter()
            if name in gpu_parts:
                got = parts[name](work, args.quick, args.device, repeats)
            else:
                got = parts[name](work, args.quick)
            rows += got
            for row in got:
                print(f"{row[0]} {row[1]}: ours {row[2]:.4g}, reference {row[3]:.4g}, ratio "
                      f"{row[4]:.2f}, target {row[5]}: {'pass' if row[6] else 'MISS'}", flush=True)
            print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
            if args.out:  # a part at a time: what finished survives a later failure
                Path(args.out).write_text(markdown(rows, when))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, when)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
