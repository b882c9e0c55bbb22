#!/usr/bin/env bash
# Issue 7 GPU run 251 (session 34): SD1.5 b1 — the rebuilt op's weight gradient and its build's backward on the side
# stream beside ∂x (change 144, LYCO_REBUILD_STREAMS) on / off / on for LoKr beside the floor, on / off for DoRA and
# Full; the trainer's graphs against eager for lokr, lokr-lowrank, dora, full (≈ 9 min).
#   OUT=$OUT bash benchmarks/run_rebuild_streams34.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco"
step_table on 140 --baselines floor --algos lokr $A
LYCO_REBUILD_STREAMS=0 step_table off 180 --no-baselines --algos lokr $A
step_table on2 220 --no-baselines --algos lokr $A
step_table dora 265 --no-baselines --algos dora $A
LYCO_REBUILD_STREAMS=0 step_table dora_off 310 --no-baselines --algos dora $A
step_table full 350 --no-baselines --algos full $A
LYCO_REBUILD_STREAMS=0 step_table full_off 390 --no-baselines --algos full $A
graph_check 130 lokr,lokr-lowrank,dora,full
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 dora dora_off full full_off
pack_out
