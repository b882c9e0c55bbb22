#!/usr/bin/env bash
# Issue 7 GPU run 219 (session 29): the batch-1 floor ratios not measured since session 21 (LoHa, LoKr, LoKr with a full
# W2 at SD1.5 b1 and SDXL b1; LoRA and LoCon at SDXL b1) — lyco and the floor only, as captured steps.
#   OUT=$OUT bash benchmarks/run_b1_floor.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table b1 120 --baselines floor --variants lyco --jobs sd15:1 --algos loha,lokr,lokr-full $A
step_table x1 330 --baselines floor --variants lyco --jobs sdxl:1 --algos lora,locon,loha,lokr,lokr-full $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b1 x1
pack_out
