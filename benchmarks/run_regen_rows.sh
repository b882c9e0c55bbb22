#!/usr/bin/env bash
# Issue 7 GPU run 193 (session 26): the rows changes 118–119 touch besides LoRA/LoCon, with their peers in the same run —
# SD1.5 b8 LoHa (PEFT) and GLoRA (LyCORIS's Triton backend) with the floor, SDXL b4 LoHa (PEFT).
#   OUT=$OUT bash benchmarks/run_regen_rows.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table s8 110 --jobs sd15:8 --algos loha,glora --baselines floor --variants lyco,peft $A
step_table s8_ly 140 --jobs sd15:8 --algos glora --no-baselines --variants lycoris-triton $A
step_table x4 300 --jobs sdxl:4 --algos loha --no-baselines --variants lyco,peft $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records s8 s8_ly x4
pack_out
