#!/usr/bin/env bash
# --parallel fsdp checks for a CUDA machine (results go to $OUT or /tmp/gpu).
#   bash launch/gpu_check_fsdp.sh
# 1 the fsdp unit tests and one 2-rank cut/resume on CPU/gloo under this machine's torch (2.11
#   on ours: the API-compatibility check); 2 world 1 on cuda, --deterministic: sharded
#   checkpoints of a plain model, exact resume; 3 an FSDP2-wrapped model on cuda (NCCL, world
#   1) through ShardedCheckpointer: the DTensor snapshot into pinned buffers and a load back,
#   bitwise; 4 bench_sharded on cuda, world 1.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"; W=/tmp/gpuwork-fsdp; rm -rf "$W"; mkdir -p "$W"
PY=${PY:-python3}; TR="$PY -m torch.distributed.run --nproc_per_node"
export PYTHONPATH="$PWD:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
S="--synthetic-train-size 8192 --synthetic-test-size 1024 --batch-size 128 --epochs 2 --log-every-steps 0 --save-every-seconds 0 --parallel fsdp"
$PY -c "import torch;print('torch',torch.__version__, torch.cuda.get_device_name(0))"
echo "== 1 unit tests + 2-rank CPU cut/resume (CPU: one GPU takes one NCCL rank only)"
CUDA_VISIBLE_DEVICES= $PY -m pytest -q -p no:cacheprovider tests/unit/test_fsdp.py tests/integration/test_fsdp.py -m "not slow" 2>&1 | tail -3
CUDA_VISIBLE_DEVICES= $PY -m pytest -q -p no:cacheprovider tests/integration/test_fsdp.py -k "test_cut_and_resume_is_bitwise_exact" 2>&1 | tail -3
echo "== 2 world 1 on cuda, deterministic exact resume"
$TR 1 -m src.train $S --device cuda --deterministic --checkpoint-dir $W/ref 2>&1 | grep -E "done|rror"
$TR 1 -m src.train $S --device cuda --deterministic --checkpoint-dir $W/cut --max-steps 77 2>&1 | grep -E "rror|max-steps"
$TR 1 -m src.train $S --device cuda --deterministic --checkpoint-dir $W/cut 2>&1 | grep -E "done|rror|resumed"
$PY - "$W" <<'PYEOF'
import sys
from ftrain.checkpoint import load_uri
import torch
a, b = load_uri(f"{sys.argv[1]}/ref"), load_uri(f"{sys.argv[1]}/cut")
print("sharded:", a.sharded, "bitwise equal weights:",
      all(torch.equal(x, y) for x, y in zip(a.model_state().values(), b.model_state().values())))
PYEOF
echo "== 3 FSDP2 on cuda (NCCL world 1): DTensor snapshot into pinned buffers, load back"
cat > $W/dtensor_cuda.py <<'PYEOF'
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import get_state_dict
from ftrain.checkpoint import CheckpointStore, ShardedCheckpointer
from ftrain.storage import Storage
from ftrain.runtime.fsdp import load_sharded
import sys
torch.cuda.set_device(0); dist.init_process_group("nccl")
def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)).cuda()
    for layer in m: fully_shard(layer)
    fully_shard(m)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)
m, opt = build()
m(torch.randn(4, 256, device="cuda")).sum().backward(); opt.step()
store = CheckpointStore(Storage(sys.argv[1]))
saver = ShardedCheckpointer(store, 3, 3600, dist.new_group(backend="gloo"), True, 1)
msd, osd = get_state_dict(m, opt)
ok = saver.save(1, {"sharded": {"model": msd, "optimizer": osd}, "small": {}}, {"epoch": 0, "step": 1}, {"epoch": 0}, blocking=True)
pinned = all(t.to_local().is_pinned() for t in saver._sets[0].buffers.values() if hasattr(t, "to_local"))
want = {k: v.full_tensor().cpu() for k, v in m.state_dict().items()}
m2, opt2 = build()
load_sharded(store.load("step_0000000001"), m2, opt2)
got = {k: v.full_tensor().cpu() for k, v in m2.state_dict().items()}
print("committed:", ok, "pinned buffers:", pinned, "loaded back bitwise:", all(torch.equal(want[k], got[k]) for k in want))
saver.close(); dist.destroy_process_group()
PYEOF
$TR 1 $W/dtensor_cuda.py $W/dt 2>&1 | grep -E "committed|rror"
echo "== 4 bench_sharded on cuda, world 1"
$TR 1 -m launch.bench_sharded --device cuda --mib 1966 --dir $W/bench 2>&1 | grep -v Warn | tee $OUT/bench_sharded_gpu.txt
