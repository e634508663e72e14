#!/usr/bin/env bash
# Every GPU check in one run, most important first (a CUDA machine, from the repository root;
# logs and tables go to $OUT, or /tmp/gpu):
#   bash launch/gpu_check.sh [part ...]       # parts: sync bench resume fsdp (default: all)
# sync    host syncs of the training loop, counted by place (launch.sync_check)
# bench   python -m launch.bench --device cuda: P1/P9, P2, T1/T2, S1/S2, P3-P5, P7 against their
#         references (S1/S2: the raw state file from pinned memory, O_DIRECT)
# resume  deterministic exact resume through torchrun (NCCL, world 1); the GPU checkpoint
#         predicted on CPU; SIGTERM -> emergency checkpoint, exit 143
# fsdp    launch/gpu_check_fsdp.sh (--parallel fsdp on this machine's torch and on cuda)
# Each part has its own time limit (FTT_GPU_LIMIT_<PART> seconds) and a failing part does not
# stop the next.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"; W=/tmp/gpuwork; rm -rf "$W"; mkdir -p "$W"
PY=${PY:-python3}; TR="$PY -m torch.distributed.run --nproc_per_node 1 --master_port 29533"
export PYTHONPATH="$PWD:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
S="--synthetic-train-size 8192 --synthetic-test-size 1024 --batch-size 128 --epochs 2 --log-every-steps 0 --save-every-seconds 0"
PARTS=${*:-sync bench resume fsdp}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch,torchvision,fsspec,xxhash;print('torch',torch.__version__,'tv',torchvision.__version__,'fsspec',fsspec.__version__, torch.cuda.get_device_name(0))"
$PY -c "import s3fs" 2>/dev/null && echo "s3fs present" || echo "s3fs absent (expected; imported only for s3://)"

part_sync() {
  $PY -m launch.sync_check --device cuda --epochs 2 --log-every-steps 0 --save-every-steps 20 \
    --synthetic-train-size 16384 --checkpoint-dir $W/sync
  echo "(the default job: 16384 samples, batch 256, 2 epochs = 128 steps, a save every 20)"
  $PY -m launch.sync_check --device cuda --epochs 1 --log-every-steps 0 --save-every-steps 0 \
    --synthetic-train-size 16384 --data-on-device off --checkpoint-dir $W/sync-loader
  echo "(same with its DataLoader, --data-on-device off: 1 epoch = 64 steps)"
}

part_bench() {
  $PY -m launch.bench --device cuda --repeats 2 --out "$OUT/bench_gpu.md"
}

part_resume() {
  echo "== deterministic exact resume (NCCL world 1)"
  $TR -m src.train $S --deterministic --checkpoint-dir $W/ref 2>&1 | grep -E "done|rror"
  $TR -m src.train $S --deterministic --checkpoint-dir $W/cut --max-steps 77 2>&1 | grep -E "done|rror|max-steps"
  $TR -m src.train $S --deterministic --checkpoint-dir $W/cut 2>&1 | grep -E "done|rror|resumed"
  $PY -m src.ckpt export $W/ref $W/ref.pth && $PY -m src.ckpt export $W/cut $W/cut.pth
  $PY - "$W" <<'PYEOF'
import json, subprocess, sys, torch
w = sys.argv[1]
a, b = torch.load(f"{w}/ref.pth"), torch.load(f"{w}/cut.pth")
print("bitwise equal weights:", all(torch.equal(a[k], b[k]) for k in a))
h = [json.loads(subprocess.check_output([sys.executable, "-m", "src.ckpt", "inspect", f"{w}/{d}", "--json"]))["history"] for d in ("ref", "cut")]
strip = lambda hs: [{k: v for k, v in e.items() if k not in ("seconds", "samples_per_s")} for e in hs]
print("same metric history:", strip(h[0]) == strip(h[1]))
PYEOF
  echo "== the GPU checkpoint predicted on CPU"
  CUDA_VISIBLE_DEVICES= $PY -m src.predict --checkpoint $W/ref --limit 500 --show 2 --device cpu; echo "rc=$?"
  echo "== SIGTERM -> emergency checkpoint"
  $TR -m src.train --synthetic-train-size 65536 --epochs 20 --log-every-steps 0 --checkpoint-dir $W/pre > $W/pre.log 2>&1 &
  local pid=$!
  for _ in $(seq 60); do grep -q "epoch 1/20 done" $W/pre.log && break; sleep 0.5; done
  kill -TERM $pid; wait $pid; echo "torchrun exit $?"
  grep -E "SIGTERM|emergency|committed|exit" $W/pre.log | tail -4
  $PY -m src.ckpt ls $W/pre
}

part_fsdp() {
  bash launch/gpu_check_fsdp.sh
}

for part in $PARTS; do
  var="FTT_GPU_LIMIT_${part^^}"; limit=${!var:-300}
  echo "######## $part (limit ${limit}s)"
  t0=$(date +%s)
  export -f "part_$part"; export PY TR S W OUT
  timeout -k 5 "$limit" bash -c "part_$part" 2>&1 | grep -v -E "Warning: .*deprecated|warnings.warn" | tee "$OUT/$part.log"
  echo "######## $part: ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
done
