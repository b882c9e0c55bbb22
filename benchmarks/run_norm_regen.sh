#!/usr/bin/env bash
# Issue 7 GPU run 188 (session 26): LYCO_NORM_REGEN — a layer norm's output (q/k/v's, attn2.to_q's, the GEGLU
# projection's input) rebuilt in backward from the norm's input and stats, in captured steps read by the ∂D kernel —
# its gradients on the real SD1.5 config against the kept inputs', the trainer's graphs against eager, and the step's
# peak and time with it on / off / on (SD1.5 b8 LoRA and LoCon with the floor and PEFT, SDXL b4 LoRA with PEFT).
#   OUT=$OUT bash benchmarks/run_norm_regen.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
regen_check 120 lora
graph_check 100 lora,locon
echo "checks: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 290 --jobs sd15:8 --algos lora,locon --baselines floor --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table s8_off 330 --jobs sd15:8 --algos lora,locon --no-baselines --variants lyco $A)
step_table s8_on2 350 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
step_table x4 440 --jobs sdxl:4 --algos lora --no-baselines --variants lyco,peft $A
(export LYCO_NORM_REGEN=0; step_table x4_off 500 --jobs sdxl:4 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log $OUT/*.log | grep -c 'self-test')"
step_records s8 s8_off s8_on2 x4 x4_off
pack_out
