#!/usr/bin/env bash
# Issue 7, session 43: SDXL b1 LoCon and LoKr with LYCO_SIDE_SMS at its default (32) and at 0, the floor in the first
# leg (the end of the session's device time: one A/B).
#   OUT=$OUT bash benchmarks/run_sidesms43d.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --jobs sdxl:1 --algos locon,lokr"
step_table on 90 $A --baselines floor
(export LYCO_SIDE_SMS=0; step_table off 150 $A --no-baselines)
step_records on off
pack_out
