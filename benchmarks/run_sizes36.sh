#!/usr/bin/env bash
# Issue 7 GPU run of session 36 after changes 149–150: the floor beside LoRA, LoCon and LoKr at SDXL b1, and beside
# LoKr at SD1.5 b8 — floor ratios within one run at the sizes run 262 did not take.
#   OUT=$OUT bash benchmarks/run_sizes36.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table xl1 300 $A --jobs sdxl:1 --baselines floor --algos lokr,locon,lora
step_table b8 420 $A --jobs sd15:8 --baselines floor --algos lokr
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records xl1 b8
pack_out
