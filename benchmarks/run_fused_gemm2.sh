#!/usr/bin/env bash
# Issue 7 GPU run 133 (NOTES change 91): the fused GEMM's tile configuration — every configuration of
# fused_gemm_check.py's sweep on the shapes the rule takes (weighted by SD1.5 b8's layer counts), the best written as
# LYCO_FUSED_GEMM_CFG; then SD1.5 b8 as graphs with it, with the defaults, with it again (LoRA, LoCon; floor first).
#   OUT=$OUT bash benchmarks/run_fused_gemm2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 260 python3 benchmarks/experiments/fused_gemm_check.py --sweep "$OUT/best.env" > "$OUT/fused_gemm_sweep.txt" 2>&1
echo "fused_gemm_check --sweep rc=$?"; grep -v Warn "$OUT/fused_gemm_sweep.txt" | grep -E "sweep|FAIL|tolerance" | cut -c1-200
cat "$OUT/best.env"
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos lora,locon --variants lyco"
(. "$OUT/best.env"; step_table tuned 330 $ARGS --baselines floor)
step_table default 400 $ARGS --no-baselines
(. "$OUT/best.env"; step_table tuned2 470 $ARGS --no-baselines)
pack_out
