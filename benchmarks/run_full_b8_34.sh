#!/usr/bin/env bash
# Issue 7 GPU run 253 (session 34): Full at SD1.5 b8 with the rebuilt op's side-stream backward (change 144,
# LYCO_REBUILD_STREAMS) on / off — run 252's deadline left the "on" leg out (≈ 2.5 min).
#   OUT=$OUT bash benchmarks/run_full_b8_34.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --variants lyco --no-baselines --jobs sd15:8 --algos full"
step_table on 90 $A
LYCO_REBUILD_STREAMS=0 step_table off 150 $A
step_records on off
pack_out
