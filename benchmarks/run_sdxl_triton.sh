#!/usr/bin/env bash
# Issue 7 GPU run 43: the host cost per call of the Triton kernels against the torch ops they replace
# (launch_bench.py), then SDXL, batch 4, 1024 px: DoRA and GLoRA on the Triton kernels against LyCORIS (one eager
# round of 10 steps, one CUDA graph).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_sdxl_triton.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
timeout 60 python3 benchmarks/launch_bench.py --out "$OUT"
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos dora,glora --variants lyco,lycoris-eager \
  --steps 10 --warmup 3 --graph --graph-steps 8 --baselines floor \
  --deadline $((S + 520)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sdxl" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"
