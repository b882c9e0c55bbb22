#!/usr/bin/env bash
# Issue 7 GPU run 192 (session 26): the ∂D kernel as kept after run 191 (its second launch over 256 columns a program)
# — gradients on the real SD1.5 config, the trainer's graphs against eager, and LYCO_NORM_REGEN on / off / on: SD1.5
# b8 LoRA and LoCon with the floor and PEFT, SDXL b4 LoRA with PEFT, SDXL b1 LoRA with the floor and PEFT.
#   OUT=$OUT bash benchmarks/run_norm_regen3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 120 lora
graph_check 100 lora,locon
echo "checks: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 270 --jobs sd15:8 --algos lora,locon --baselines floor --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table s8_off 300 --jobs sd15:8 --algos lora,locon --no-baselines --variants lyco $A)
step_table s8_on2 320 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 400 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table x4_off 440 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
step_table x1 490 --jobs sdxl:1 --algos lora --baselines floor --variants lyco $A
(export LYCO_NORM_REGEN=0; step_table x1_off 520 --jobs sdxl:1 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_off s8_on2 x4 x4_off x1 x1_off
pack_out
