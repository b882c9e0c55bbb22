#!/usr/bin/env bash
# Issue 7 GPU run 198 (session 27): change 120 at SDXL — b4 LoRA (lyco, PEFT) and LoHa (lyco), b1 LoRA with the floor
# and PEFT; LYCO_GEGLU_FUSE=0 for each lyco row.
#   OUT=$OUT bash benchmarks/run_geglu_fuse4.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table x4 150 --jobs sdxl:4 --algos lora,loha --no-baselines --variants lyco $A
step_table x4_peft 200 --jobs sdxl:4 --algos lora --no-baselines --variants peft $A
(export LYCO_GEGLU_FUSE=0; step_table x4_off 300 --jobs sdxl:4 --algos lora,loha --no-baselines --variants lyco $A)
step_table x1 400 --jobs sdxl:1 --algos lora --baselines floor --variants lyco,peft $A
(export LYCO_GEGLU_FUSE=0; step_table x1_off 450 --jobs sdxl:1 --algos lora --no-baselines --variants lyco $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records x4 x4_peft x4_off x1 x1_off
pack_out
