#!/usr/bin/env bash
# Issue 7 GPU run 194 (session 26): run 193's SD1.5 b8 rows its deadline cut (PEFT's LoHa, lyco's GLoRA), every
# configuration of the size again in one run — the floor, LoHa (lyco, PEFT), GLoRA (lyco, LyCORIS's Triton backend).
#   OUT=$OUT bash benchmarks/run_regen_rows2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 200 --jobs sd15:8 --algos loha,glora --baselines floor --variants lyco,peft $A
step_table s8_ly 240 --jobs sd15:8 --algos glora --no-baselines --variants lycoris-triton $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_ly
pack_out
