#!/usr/bin/env bash
# One-shot GPU check of the valuation engine (prepared on a CPU-only machine; run where CUDA exists).
#
#   bash benchmarks/gpu_engine.sh            # results under $OUT (default /tmp/engine_gpu)
#
# 1. exactness on the GPU: grad_dot_products vs brute force (tiny tied GPT-2, float64 and fp32),
#    and bf16 autocast values vs fp32 values (correlation);
# 2. overhead of valued vs plain training steps for the full GPT-2 small (T=1024, batch 16, bf16
#    autocast, AdamW, clip 1.0), first order, second order and AdamW-aware, with 1 and 4 validation
#    sequences of 1024 tokens;
# 3. direct per-sample gradients (torch.func vmap) at batch 4 for contrast (may run out of memory;
#    reported, not fatal).
# 4. the CPU cost-floor shape of the valued-step issue (GPT-2 small, batch 16 x 128, 4 per-example texts of
#    64 tokens), fp32 and bf16, so that the GPU ratio sits beside the CPU one.
# Each step has its own timeout so the whole script stays under 9 minutes (one device call).
set -uo pipefail
OUT=${OUT:-/tmp/engine_gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 3
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true

timeout 90 $PY - > "$OUT/exactness.txt" 2>&1 <<'PYEOF'
import sys
import numpy as np
import torch
sys.path.insert(0, "tests")
from test_engine_helpers import ragged_batch, rel_err, tiny_gpt2
from attribution.engine import Valuer, ValSet, grad_dot_products
from attribution.engine.exact import brute_grad_dot_products
tr, tm = ragged_batch(5, 12, seed=1)
va, vm = ragged_batch(3, 10, seed=2)
ref = brute_grad_dot_products(tiny_gpt2(), tr, va, train_mask=tm, val_mask=vm)
for dtype in (torch.float64, torch.float32):
    model = tiny_gpt2(dtype=dtype).cuda()
    for strategy in (None, "ghost", "project", "materialize"):
        got = grad_dot_products(model, tr.cuda(), va.cuda(), train_mask=tm.cuda(), val_mask=vm.cuda(), strategy=strategy)
        print(f"cuda {dtype} {strategy}: max rel err {rel_err(got.cpu(), ref):.2e}")
model = tiny_gpt2(dtype=torch.float32, n_embd=64).cuda()
vals = {}
for amp in (None, torch.bfloat16):
    v = Valuer(model, {"v": ValSet(va, vm)}, autocast_dtype=amp)
    v.forward_backward(tr.cuda(), tm.cuda())
    vals[amp] = v.values(0.1).per_set["v"]
    v.close()
    model.zero_grad(set_to_none=True)
print("bf16 vs fp32 values: corr", np.corrcoef(vals[None], vals[torch.bfloat16])[0, 1])
PYEOF
echo "exactness rc=$?" >> "$OUT/exactness.txt"

B="$PY benchmarks/engine_overhead.py --model gpt2-small --device cuda --dtype bf16"
timeout 160 $B --reps 5 --val-seqs 1 --val-len 1024 --modes plain,order1,order2,aware --plan \
  --json "$OUT/gpt2_small_val1.json" > "$OUT/gpt2_small_val1.md" 2> "$OUT/gpt2_small_val1.err"
timeout 100 $B --reps 3 --val-seqs 4 --val-len 1024 --modes plain,order1 \
  --json "$OUT/gpt2_small_val4.json" > "$OUT/gpt2_small_val4.md" 2> "$OUT/gpt2_small_val4.err"
timeout 100 $B --reps 3 --batch 4 --val-seqs 1 --val-len 1024 --modes plain,order1,vmap \
  --json "$OUT/gpt2_small_vmap.json" > "$OUT/gpt2_small_vmap.md" 2> "$OUT/gpt2_small_vmap.err"
for dt in fp32 bf16; do
  timeout 50 $B --dtype $dt --reps 5 --batch 16 --seq-len 128 --val-seqs 4 --val-len 64 --modes plain,order1,order2,aware \
    --json "$OUT/gpt2_small_cpushape_$dt.json" > "$OUT/gpt2_small_cpushape_$dt.md" 2> "$OUT/gpt2_small_cpushape_$dt.err"
done
cat "$OUT/gpu.txt" "$OUT"/*.md "$OUT/exactness.txt"
tail -n 3 "$OUT"/*.err
