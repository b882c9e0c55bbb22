#!/usr/bin/env bash
# Issue 7 GPU run of session 37 (fourth): the sizes on the channels-last frozen layout (lyco.models.layout's
# rule, train_step.py --frozen-cl rule; lowrank._merged_cl in) — SD1.5 b8 with PEFT's LoRA beside lyco's, SDXL b4.
#   OUT=$OUT bash benchmarks/run_cl37d.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --frozen-cl rule"
step_table b8 300 --jobs sd15:8 $A --baselines floor --variants lyco,peft --algos lora,locon,lokr --skip locon/peft,lokr/peft
step_table xl4 480 --jobs sdxl:4 $A --baselines floor --variants lyco --algos lora
grep -h "channels-last" $OUT/*/train_step.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b8 xl4
pack_out
