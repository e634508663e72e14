"""The PERFORMANCE.md measures, each against its reference measured in the same run.

    python -m launch.bench [--quick] [--out docs/benchmarks.md]

P1  default job throughput (one process, epoch 2)      vs a plain loop, same model/data/batch
P2  throughput with saves every 50 / every 4 steps      vs the same run without saves
    ... and with storage slower than the cadence        (FTT_TEST_PAUSE_IN_SAVE=1: 1 s a save)
P3  stall per save                                      vs the snapshot floor
P4  stall per save                                      vs a synchronous torch.save + fsync
P5  background persist                                  vs raw write + fsync of the same bytes
P6  SIGKILL of a 2-worker job -> first step after the restart, minus the launcher floor (a
    trivial torchrun script's start-up + process group), vs 2 s + the checkpoint load
P7  verified load                                       vs raw read of the same bytes
P8  steps lost per SIGTERM / per SIGKILL in a short chaos run vs 0 / max(save interval, persist)

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

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTT_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    env.update(extra or {})
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
def plain_loop_rate(train_size: int, batch: int, seed: int = 0) -> float:
    """A plain loop: the same CNN, synthetic data and batch, batches indexed from the tensors,
    SGD with momentum; samples/s over its second epoch."""
    import torch

    from ftrain.data import make_synthetic
    from ftrain.models import SmallCNN

    train, _ = make_synthetic(seed, train_size, 128)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    steps = train_size // batch
    rate = 0.0
    for _epoch in range(2):
        order = torch.randperm(train_size)
        t0 = time.perf_counter()
        for b in range(steps):
            idx = order[b * batch:(b + 1) * batch]
            loss = loss_fn(model(train.x[idx]), train.y[idx]) / batch
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rate = steps * batch / (time.perf_counter() - t0)
    return rate


def p1(work: Path, quick: bool) -> list[tuple]:
    n = 4096 if quick else 12288
    common = ["--epochs", "2", "--synthetic-train-size", str(n), "--log-every-steps", "0",
              "--save-every-seconds", "0"]
    ours_runs, ref_runs = [], []
    for rep in range(1 if quick else 3):  # interleaved: the machine's noise hits both alike
        ours_runs.append(_epoch_rate(_train([*common, "--checkpoint-dir",
                                             str(work / f"p1-{rep}")]), 2))
        ref_runs.append(plain_loop_rate(n, 256))
    ours, ref = statistics.median(ours_runs), statistics.median(ref_runs)
    return [("P1", "default job samples/s / plain loop (1 process, epoch 2)", ours, ref,
             ours / ref, ">= 0.97", ours / ref >= 0.97)]


def p2(work: Path, quick: bool) -> list[tuple]:
    n = 4096 if quick else 16384
    # Epoch 2 is measured: the host buffers of the snapshots exist by then (steady state).
    common = ["--model", "mlp", "--width", "1024", "--depth", "4", "--epochs", "2",
              "--synthetic-train-size", str(n), "--synthetic-test-size", "256",
              "--batch-size", "32", "--log-every-steps", "0", "--save-every-seconds", "0",
              "--keep-last", "2"]
    runs = {"none": ([], {}), "4": (["--save-every-steps", "4"], {}),
            "50": (["--save-every-steps", "50"], {}),
            "slow": (["--save-every-steps", "4"], {"FTT_TEST_PAUSE_IN_SAVE": "1"})}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(1 if quick else 3):  # interleaved: the machine's noise hits all alike
        for key, (extra, env) in runs.items():
            folder = work / f"p2-{key}-{rep}"
            rates[key].append(_epoch_rate(_train([*common, *extra, "--checkpoint-dir",
                                                  str(folder)], env=env), 2))
    none, saves, some, slow = (statistics.median(rates[k]) for k in ("none", "4", "50", "slow"))
    return [("P2", "samples/s with saves every 50 steps / without (MLP 1024x4, 26 MiB)", some,
             none, some / none, ">= 0.97", some / none >= 0.97),
            ("P2", "same, saves every 4 steps (about 30 saves a second here)", saves, none,
             saves / none, ">= 0.97", saves / none >= 0.97),
            ("P2", "same, storage taking 1 s per save (slower than the cadence)", slow, none,
             slow / none, ">= 0.97", slow / none >= 0.97)]


# ---------------------------------------------------------------------------- P3-P5, P7
def checkpoint_measures(work: Path, quick: bool) -> list[tuple]:
    r = subprocess.run([PY, "-m", "launch.bench_checkpoint", "--mib", "128" if quick else "384",
                        "--repeats", "3" if quick else "5", "--dir", str(work / "ckpt")],
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
    return [("P6", "SIGKILL -> first step after restart, minus the launcher floor "
             f"({floor:.2f} s)", ours, 2.0 + load, ours / (2.0 + load), "<= 1.0",
             ours <= 2.0 + load)]


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
    p.add_argument("--only", default="", help="comma-separated subset: p1,p2,ckpt,p6,p8")
    p.add_argument("--out", default="", help="write the Markdown table here")
    args = p.parse_args(argv)
    parts = {"p1": p1, "p2": p2, "ckpt": checkpoint_measures, "p6": p6, "p8": p8}
    chosen = [x.strip().lower() for x in args.only.split(",") if x.strip()] or list(parts)
    unknown = [x for x in chosen if x not in parts]
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(parts)}")
    work = Path(tempfile.mkdtemp(prefix="ftrain-bench-"))
    rows: list[tuple] = []
    try:
        for name in chosen:
            t0 = time.perf_counter()
            got = parts[name](work, args.quick)
            rows += got
            for row in got:
                print(f"{row[0]} {row[1]}: ours {row[2]:.4g}, reference {row[3]:.4g}, ratio "
                      f"{row[4]:.2f}, target {row[5]}: {'pass' if row[6] else 'MISS'}", flush=True)
            print(f"  ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows, time.strftime("%Y-%m-%d"))
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
