#!/usr/bin/env bash
# (The rows form was taken out after this run — slower; NOTES change 94, kept as
# benchmarks/experiments/fused_gemm_rows.patch: LYCO_FUSED_GEMM_FORM no longer exists.)
# Issue 7 GPU run 138 (NOTES change 94): the fused GEMM with one program per row block (h accumulated with the first
# column block and kept for the others, LYCO_FUSED_GEMM_FORM=rows) against one program per tile (each computes h):
# the kernel per shape against float64 and timed (rows form), then SD1.5 b8 LoRA as graphs rows / tiles / rows.
#   OUT=$OUT bash benchmarks/run_fused_rows.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
(export LYCO_FUSED_GEMM_FORM=rows; timeout 60 python3 benchmarks/experiments/fused_gemm_check.py \
  > "$OUT/fused_gemm_check_rows.txt" 2>&1; echo "fused_gemm_check (rows) rc=$?")
grep -v Warn "$OUT/fused_gemm_check_rows.txt" | cut -c1-230
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lora --variants lyco"
(export LYCO_FUSED_GEMM_FORM=rows; step_table rows 110 $ARGS --baselines floor)
step_table tiles 160 $ARGS --no-baselines
(export LYCO_FUSED_GEMM_FORM=rows; step_table rows2 210 $ARGS --no-baselines)
pack_out
