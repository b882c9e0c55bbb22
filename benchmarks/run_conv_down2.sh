#!/usr/bin/env bash
# Issue 7 GPU run 215 (session 28): run 214 again after its trainer check failed (under autocast lowrank.conv_down's
# backward mixed an fp32 weight with bf16 ∂h; both are now cast outside the op) — the trainer's graphs against eager
# (locon, lora), SD1.5 b1 LoCon with PEFT, LYCO_CONV_DOWN_IM2COL at 0 between two default legs.
#   OUT=$OUT bash benchmarks/run_conv_down2.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 120 locon,lora
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos locon --jobs sd15:1"
step_table b1 260 --baselines floor --variants lyco,peft $A
(export LYCO_CONV_DOWN_IM2COL=0; step_table b1_off 300 --no-baselines --variants lyco $A)
step_table b1_on2 340 --no-baselines --variants lyco,peft $A
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records b1 b1_off b1_on2
pack_out
