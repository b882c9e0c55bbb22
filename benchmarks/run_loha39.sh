#!/usr/bin/env bash
# Issue 7 GPU run of session 39: LoHa's batch-1 floor ratios as given on the H200 (goal ≤ 1.3; met on the H100 since
# session 34 at 1.290 for SD1.5 b1 — close enough that the card could move it): SD1.5 b1 and SDXL b1, floor and LoHa.
#   OUT=$OUT bash benchmarks/run_loha39.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --baselines floor --algos loha"
step_table sd 130 $A --jobs sd15:1
step_table xl 300 $A --jobs sdxl:1
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records sd xl
pack_out
