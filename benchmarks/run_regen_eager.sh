#!/usr/bin/env bash
# Issue 7 GPU run 183 (session 25): LYCO_INPUT_REGEN in eager steps (LoRA's down on the delta path, regen.linear) —
# bitwise against the kept input on the real SD1.5 config, and the eager step's peak and time on/off with PEFT.
# (runs 178–183 printed a subset of step_records' fields with a loop of their own)
#   OUT=$OUT bash benchmarks/run_regen_eager.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 80 lora --eager
A="--rounds 1 --steps 8 --warmup 2"
step_table s8 110 --jobs sd15:8 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table s8_off 130 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A)
step_table x4 200 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_INPUT_REGEN=0; step_table x4_off 240 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_records s8 s8_off x4 x4_off
pack_out
