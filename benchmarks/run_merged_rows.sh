#!/usr/bin/env bash
# Issue 7 GPU run 238 (session 32): a linear layer's merged weight only where its rows pay for it (change 134,
# lowrank._merged_pays, LYCO_MERGED_ROWS = c: forward merged where rows ≥ c·in, ∂x through W′ where rows ≥ c·out,
# else the frozen GEMM plus the rank-r product in place). SD1.5 b1 LoRA at c = 0 (the form before) beside PEFT and
# the floor, then c = 1, 0.5, 2; SD1.5 b8 and SDXL b1 at c = 0 / 1; the trainer's graphs against eager (default c).
#   OUT=$OUT bash benchmarks/run_merged_rows.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
(export LYCO_MERGED_ROWS=0; step_table c0 110 --baselines floor --variants lyco,peft $J)
(export LYCO_MERGED_ROWS=1; step_table c1 140 --no-baselines --variants lyco $J)
(export LYCO_MERGED_ROWS=0.5; step_table c05 170 --no-baselines --variants lyco $J)
(export LYCO_MERGED_ROWS=2; step_table c2 200 --no-baselines --variants lyco $J)
(export LYCO_MERGED_ROWS=1; step_table c1b 230 --no-baselines --variants lyco $J)
(export LYCO_MERGED_ROWS=0; step_table s8c0 265 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A)
(export LYCO_MERGED_ROWS=1; step_table s8c1 300 --no-baselines --variants lyco --jobs sd15:8 --algos lora $A)
(export LYCO_MERGED_ROWS=0; step_table x1c0 350 --no-baselines --variants lyco --jobs sdxl:1 --algos lora $A)
(export LYCO_MERGED_ROWS=1; step_table x1c1 400 --no-baselines --variants lyco --jobs sdxl:1 --algos lora $A)
graph_check 60 lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records c0 c1 c05 c2 c1b s8c0 s8c1 x1c0 x1c1
pack_out
