#!/usr/bin/env bash
# GPU checks (run on a CUDA machine from the repository root; results go to $OUT or /tmp/gpu).
#   bash launch/gpu_check.sh
# 1 single-process GPU run; 2 deterministic exact resume through torchrun (NCCL, world 1);
# 3 a GPU-saved checkpoint predicted on CPU; 4 SIGTERM emergency checkpoint; 5 checkpoint
# cost benchmark (P3/P4/P5/P7); 6 default job throughput, GPU vs CPU.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"; W=/tmp/gpuwork; rm -rf "$W"; mkdir -p "$W"
PY=${PY:-python3}; TR="$PY -m torch.distributed.run --nproc_per_node 1 --master_port 29533"
S="--synthetic-train-size 8192 --synthetic-test-size 1024 --batch-size 128 --epochs 2 --log-every-steps 0 --save-every-seconds 0"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch,torchvision,fsspec;print('torch',torch.__version__,'tv',torchvision.__version__,'fsspec',fsspec.__version__)"
$PY -c "import s3fs" 2>/dev/null && echo "s3fs present" || echo "s3fs absent (expected; imported only for s3://)"
echo "== 1 single process on cuda"; $PY -m src.train $S --device cuda --checkpoint-dir $W/g1 2>&1 | grep -E "training|done|error|Error" ; echo "rc=${PIPESTATUS[0]}"
echo "== 2 deterministic exact resume (NCCL world 1)"
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
echo "== 3 GPU checkpoint on CPU"; CUDA_VISIBLE_DEVICES= $PY -m src.predict --checkpoint $W/ref --limit 500 --show 2 --device cpu; echo "rc=$?"
echo "== 4 SIGTERM emergency checkpoint"
( $TR -m src.train --synthetic-train-size 65536 --epochs 3 --log-every-steps 0 --checkpoint-dir $W/pre > $W/pre.log 2>&1 & echo $! > $W/pre.pid; wait )&
sleep 25; kill -TERM "$(cat $W/pre.pid)"; sleep 15; grep -E "SIGTERM|emergency|committed|exit" $W/pre.log | tail -5
$PY -m src.ckpt ls $W/pre
echo "== 5 checkpoint benchmark"; $PY -m launch.bench_checkpoint --device cuda --mib 1966 --dir $W/bench 2>&1 | tee $OUT/bench_gpu.txt
echo "== 6 default job throughput"; $PY -m src.train --device cuda --checkpoint-dir $W/tp --epochs 2 2>&1 | grep "done"
