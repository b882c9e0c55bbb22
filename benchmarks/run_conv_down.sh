#!/usr/bin/env bash
# Issue 7 GPU run 214 (session 28): LoCon's conv downs on the delta path with ∂D by one batched GEMM
# (lowrank.conv_down, LYCO_CONV_DOWN_IM2COL; run 212's timeline: cuDNN's wgrad2d_shmem_tiling, 12 launches, 0.54 ms at
# SD1.5 b1) — SD1.5 b1 and b8 LoCon with PEFT, the switch at 0; the trainer's graphs against eager (locon).
#   OUT=$OUT bash benchmarks/run_conv_down.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 80 locon
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos locon"
step_table b1 250 --baselines floor --variants lyco,peft --jobs sd15:1 $A
(export LYCO_CONV_DOWN_IM2COL=0; step_table b1_off 290 --no-baselines --variants lyco --jobs sd15:1 $A)
step_table b1_on2 320 --no-baselines --variants lyco --jobs sd15:1 $A
step_table b8 420 --no-baselines --variants lyco,peft --jobs sd15:8 $A
(export LYCO_CONV_DOWN_IM2COL=0; step_table b8_off 460 --no-baselines --variants lyco --jobs sd15:8 $A)
echo "self-test warnings: $(cat $OUT/*/train_step.log | grep -c 'self-test')"
step_records b1 b1_off b1_on2 b8 b8_off
pack_out
