#!/usr/bin/env bash
# Issue 7 GPU run 197 (session 27): change 120 with run 196's tile — the trainer's graphs against eager, then SD1.5 b8:
# the floor, LoRA, LoCon, LoHa (lyco, PEFT), GLoRA (lyco, LyCORIS's Triton backend); LYCO_GEGLU_FUSE=0 for LoRA, LoCon
# and LoHa; LoRA on again.
#   OUT=$OUT bash benchmarks/run_geglu_fuse3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 170 lora,locon,loha
echo "checks: wall $(( $(date +%s) - S )) s"
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 330 --jobs sd15:8 --algos lora,locon,loha,glora --baselines floor --variants lyco,peft $A
step_table s8_ly 370 --jobs sd15:8 --algos glora --no-baselines --variants lycoris-triton $A
(export LYCO_GEGLU_FUSE=0; step_table s8_off 430 --jobs sd15:8 --algos lora,locon,loha --no-baselines --variants lyco $A)
step_table s8_on2 460 --jobs sd15:8 --algos lora --no-baselines --variants lyco $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_ly s8_off s8_on2
pack_out
