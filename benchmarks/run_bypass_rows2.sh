#!/usr/bin/env bash
# Issue 7 GPU run 166 (session 22): change 109 (the op on every linear layer and 1×1 conv in captured steps,
# lowrank._ROWS_STREAMS = 0) at the sizes run 165 did not reach: SD1.5 b1 and b8, A/B/A against the previous rule
# (LYCO_BYPASS_ROWS=1).
#   OUT=$OUT bash benchmarks/run_bypass_rows2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table s1_new 100 --jobs sd15:1 --algos lora,locon,loha,lokr,glora,ia3 --baselines floor $A
(export LYCO_BYPASS_ROWS=1; step_table s1_old 160 --jobs sd15:1 --algos lora,locon,loha,lokr,glora --no-baselines $A)
step_table s1_new2 185 --jobs sd15:1 --algos lora,locon --no-baselines $A
step_table s8_new 235 --jobs sd15:8 --algos lora,locon --baselines floor $A
(export LYCO_BYPASS_ROWS=1; step_table s8_old 280 --jobs sd15:8 --algos lora,locon --no-baselines $A)
step_table s8_new2 300 --jobs sd15:8 --algos lora --no-baselines $A
pack_out
