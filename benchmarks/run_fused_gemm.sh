#!/usr/bin/env bash
# Issue 7 GPU run 132 (NOTES change 91): a low-rank linear layer's forward as one Triton GEMM (lowrank_gemm.py; the
# frozen product, the down in the same k-loop, the up and bias in the epilogue) on the many-row narrow layers.
# First the kernel per shape against float64 and timed against the bypass op's three kernels (fused_gemm_check.py),
# the shared-input op's GPU check (its forward now takes the kernel: 8192 rows × 320); then SD1.5 b8 as graphs,
# A/B/A of LYCO_FUSED_GEMM (LoRA, LoCon; the floor alongside); the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_fused_gemm.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 150 python3 benchmarks/experiments/fused_gemm_check.py > "$OUT/fused_gemm_check.txt" 2>&1
echo "fused_gemm_check rc=$?"; grep -v Warn "$OUT/fused_gemm_check.txt" | cut -c1-230
timeout 120 python3 benchmarks/experiments/shared_input_check.py > "$OUT/shared_input_check.txt" 2>&1
echo "shared_input_check rc=$?"; grep -v Warn "$OUT/shared_input_check.txt" | cut -c1-230
aba LYCO_FUSED_GEMM 170 240 310 --models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora,locon --variants lyco
graph_check 120 lora,lora-te,locon
pack_out
