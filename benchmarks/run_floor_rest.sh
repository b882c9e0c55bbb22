#!/usr/bin/env bash
# Issue 7 GPU run 221 (session 29): floor ratios last measured before the bypass op's later changes — SDXL b4 LoCon and
# LoKr with a full W2 (runs 161/174), and SD1.5 b1 LoKr full (left out of runs 219–220 by their deadlines).
#   OUT=$OUT bash benchmarks/run_floor_rest.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table b1 60 --baselines floor --variants lyco --jobs sd15:1 --algos lokr-full $A
step_table x4 300 --baselines floor --variants lyco --jobs sdxl:4 --algos locon,lokr-full $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 x4
pack_out
