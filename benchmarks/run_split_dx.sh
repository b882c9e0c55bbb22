#!/usr/bin/env bash
# (Taken out after this run — no gain in the step; NOTES change 93, kept as benchmarks/experiments/shared_split_dx.patch:
# LYCO_SHARED_SPLIT_DX no longer exists.)
# Issue 7 GPU run 136 (NOTES change 93): the q/k/v group's ∂x split — Σ ∂y_i·W_i plus one GEMM [∂h…]·[D…] — where
# the merged weights were launch-bound (≤ 8192 rows). The group on the GPU against float64 (shared_input_check.py:
# 8192 rows, so split), SD1.5 b8 as graphs, A/B/A of LYCO_SHARED_SPLIT_DX (LoRA, LoCon; the floor alongside), the
# trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_split_dx.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 120 python3 benchmarks/experiments/shared_input_check.py > "$OUT/shared_input_check.txt" 2>&1
echo "shared_input_check rc=$?"; grep -v Warn "$OUT/shared_input_check.txt" | cut -c1-230
aba LYCO_SHARED_SPLIT_DX 150 220 290 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 \
  --algos lora,locon --variants lyco
graph_check 120 lora,lora-te,lora-ckpt,locon
pack_out
