#!/usr/bin/env bash
# Issue 7 GPU run of session 39, after run 281: change 161 (LYCO_ACC_CL) at SD1.5 b8 and SDXL b1 on the frozen conv
# layout, on then off (the floor beside the first), and the same-run A/B of change 160 (LYCO_AHEAD_LATE, off by
# default) that run 278 could not make: SD1.5 b1 LoRA on the layout, on / off / on.
#   OUT=$OUT bash benchmarks/run_acc_cl39b.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --frozen-cl rule --variants lyco"
step_table b8on 130 $A --jobs sd15:8 --baselines floor --algos lokr,locon
(export LYCO_ACC_CL=0; step_table b8off 190 $A --jobs sd15:8 --no-baselines --algos lokr,locon)
L="$A --jobs sd15:1 --no-baselines --algos lora"
(export LYCO_AHEAD_LATE=graph; step_table ahon 230 $L)
step_table ahoff 270 $L
(export LYCO_AHEAD_LATE=graph; step_table ahon2 310 $L)
step_table xlon 400 $A --jobs sdxl:1 --baselines floor --algos lokr
(export LYCO_ACC_CL=0; step_table xloff 470 $A --jobs sdxl:1 --no-baselines --algos lokr)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records b8on b8off ahon ahoff ahon2 xlon xloff
pack_out
