"""Persist in a thread vs in a separate process, inside a real training loop.

    python -m launch.bench_persist_mode                # a save every 20 steps, raw writes
    EVERY=50 python -m launch.bench_persist_mode       # every 50
    FORMAT=zip python -m launch.bench_persist_mode     # torch.save + fsync, as before format 4

The loop trains an MLP (1024x4, batch 32, SGD+momentum) and every K steps, when the
persister is idle, copies the state into preallocated buffers and hands them over. The
persister writes them as ftrain does (FORMAT=raw: the raw state file from one aligned buffer,
O_DIRECT, hashed in the same pass; checkpoint/rawstate.py) or with torch.save + fsync
(FORMAT=zip). Modes: none, thread (same process, shares the GIL), process (a child with
shared-memory buffers, no GIL shared with the loop).
"""
import os
import statistics
import threading
import time

import torch
import torch.multiprocessing as mp

from ftrain.checkpoint.rawstate import ALIGN, Arena, aligned_bytes, encode
from ftrain.storage.local import local_atomic_write_parts

FORMAT = os.environ.get("FORMAT", "raw")


def build():
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU()]
    for _ in range(3):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(1024, 10))
    m = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    return m, opt

def state_of(m, opt):
    momentum = {str(k): v["momentum_buffer"] for k, v in enumerate(opt.state.values())}
    return {"model": m.state_dict(), "opt": momentum}

def child(buffers, go, done, path, header=None):
    """The persister. ``buffers``: FORMAT=zip, the state's buffers; raw, the arena's buffer,
    and ``header`` a shared slot the loop puts each save's header bytes and size into."""
    while True:
        go.wait()
        go.clear()
        if FORMAT == "raw":
            head, size = header.get()
            part = aligned_bytes(-(-len(head) // ALIGN) * ALIGN, pin=False)
            part.zero_()
            part[:len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
            views = [memoryview(t.numpy()).cast("B") for t in (part, buffers)]
            local_atomic_write_parts(path, views, size, False, {})
        else:
            with open(path, "wb") as fh:
                torch.save(buffers, fh)
                fh.flush()
                os.fsync(fh.fileno())
        done.set()


class _Slot:
    """One header at a time, from the loop to a persister thread (a Queue's stand-in)."""

    def __init__(self):
        self.value = None

    def put(self, value):
        self.value = value

    def get(self):
        return self.value

def run(mode, steps=600, every=0, folder="/tmp/ftrain-persist-mode"):
    every = every or int(os.environ.get("EVERY", "20"))
    os.makedirs(folder, exist_ok=True)
    m, opt = build()
    x = torch.randn(4096, 1, 28, 28)
    y = torch.randint(0, 10, (4096,))

    def step(i):
        idx = torch.arange(i * 32 % 4064, i * 32 % 4064 + 32)
        torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()

    step(0)
    st = state_of(m, opt)
    arena = Arena(shared=mode == "process")
    if FORMAT == "raw":
        arena.copy(st)
        buffers = arena.buffer
    else:
        buffers = {k: {n: t.detach().clone() for n, t in d.items()} for k, d in st.items()}
    if mode == "process":
        if FORMAT != "raw":
            for d in buffers.values():
                for t in d.values():
                    t.share_memory_()
        ctx = mp.get_context("spawn")
        go, done, header = ctx.Event(), ctx.Event(), ctx.Queue()
        done.set()
        proc = ctx.Process(target=child, args=(buffers, go, done, f"{folder}/p.pt", header))
        proc.start()
        time.sleep(2)  # the child's start-up is not the loop's cost
    elif mode == "thread":
        go, done, header = threading.Event(), threading.Event(), _Slot()
        done.set()
        threading.Thread(target=child, args=(buffers, go, done, f"{folder}/t.pt", header),
                         daemon=True).start()
    saves = 0
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
        if mode != "none" and i % every == 0 and done.is_set():
            done.clear()
            cur = state_of(m, opt)
            if FORMAT == "raw":
                raw = encode(arena.copy(cur), arena)
                head = raw.views()[0]
                header.put((bytes(head[:raw.size - arena.used]), raw.size))
            else:
                for k, d in cur.items():
                    for n, t in d.items():
                        buffers[k][n].copy_(t)
            go.set()
            saves += 1
    rate = steps * 32 / (time.perf_counter() - t0)
    if mode == "process":
        done.wait()
        proc.terminate()
    return rate, saves

if __name__ == "__main__":
    res = {m: [] for m in ("none", "thread", "process")}
    for _rep in range(3):  # interleaved: the machine's noise hits every mode alike
        for mode in res:
            res[mode].append(run(mode))
    base = statistics.median(x[0] for x in res["none"])
    print(f"FORMAT={FORMAT}, a save every {os.environ.get('EVERY', '20')} steps")
    for mode, rs in res.items():
        r = statistics.median(x[0] for x in rs)
        print(f"{mode:8s} {r:8.0f} samples/s  ratio {r / base:.2f}  saves {[x[1] for x in rs]}")
