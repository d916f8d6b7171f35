#!/usr/bin/env bash
# Where a valued step's GPU time goes (prepared on a CPU-only machine; run where CUDA exists).
#
#   bash benchmarks/gpu_floor.sh            # results under $OUT (default /tmp/floor_gpu)
#
# 1. cost_floor.py's per-component table on the GPU (fp32) for the valued-step issue's GPT-2-small
#    shape (batch 16 x 128, 4 per-example texts of 64 tokens) at first and second order, optimizer-aware,
#    and at the paper's shape (batch 16 x 1024, one validation text of 1024 tokens);
# 2. torch.profiler's top ops for one plain and one first-order step at the paper's shape in bf16;
# 3. the in-run sketch's share of the valued step on the GPU (tensor sketch, dim 512).
# Each step has its own timeout; the whole stays under 7 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/floor_gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 3
F="$PY benchmarks/cost_floor.py --shape gpt2-small-cpu --device cuda --rounds 3"
timeout 70 $F --sketch-dim 0 --json "$OUT/floor_o1.json" > "$OUT/floor_o1.md" 2>&1
timeout 70 $F --sketch-dim 0 --order 2 --json "$OUT/floor_o2.json" > "$OUT/floor_o2.md" 2>&1
timeout 70 $F --sketch-dim 0 --optimizer-aware --json "$OUT/floor_aware.json" > "$OUT/floor_aware.md" 2>&1
timeout 70 $F --sketch-dim 0 --seq-len 1024 --val-texts 1 --val-tokens-per-text 1024 --per-example \
  --json "$OUT/floor_paper.json" > "$OUT/floor_paper.md" 2>&1
timeout 70 $F --sketch-dim 512 --json "$OUT/floor_sketch.json" > "$OUT/floor_sketch.md" 2>&1
timeout 70 $PY benchmarks/engine_overhead.py --model gpt2-small --device cuda --dtype bf16 --reps 2 \
  --modes plain,order1 --profile 25 > "$OUT/profile.md" 2> "$OUT/profile.txt"
for f in "$OUT"/floor_*.md; do echo "=== $f"; grep -E "^(shape|GEMM|\| |valuation|the in-run)" "$f" | head -40; tail -n 2 "$f"; done
cat "$OUT/profile.md"
