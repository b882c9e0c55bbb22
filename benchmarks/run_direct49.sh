#!/usr/bin/env bash
# Issue 7, session 47: change 177's shape rule for LoKr's direct factor gradients (LYCO_LOKR_DIRECT_ROWS=4 and
# LYCO_LOKR_DIRECT_MIN=2^23 by default: the 1280 → 10240 GEGLU projections only, the one shape run 330 found it
# faster on) — lokr-full as built against the rule off (D0: LYCO_LOKR_DIRECT_ROWS=0), SDXL b1 A/B/A, SDXL b4,
# SD1.5 b1 and b8 A/B; then the trainer's CUDA graphs against eager for lokr-full as built.
#   OUT=$OUT bash benchmarks/run_direct49.sh      (carry .whl; ≈ 380 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
D0=LYCO_LOKR_DIRECT_ROWS=0
step_table x1 45 $A --jobs sdxl:1 --no-baselines
(export $D0; step_table x1d 85 $A --jobs sdxl:1 --no-baselines)
step_table x1b 125 $A --jobs sdxl:1 --no-baselines
step_table x4 160 $A --jobs sdxl:4 --no-baselines
(export $D0; step_table x4d 195 $A --jobs sdxl:4 --no-baselines)
step_table s1 220 $A --jobs sd15:1 --no-baselines
(export $D0; step_table s1d 245 $A --jobs sd15:1 --no-baselines)
step_table s8 275 $A --jobs sd15:8 --no-baselines
(export $D0; step_table s8d 305 $A --jobs sd15:8 --no-baselines)
graph_check 70 lokr-full
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1d x1b x4 x4d s1 s1d s8 s8d
pack_out
