#!/usr/bin/env bash
# Issue 7 GPU run 152: SD1.5 b8 LoKr with a full W2, the eye rule (LoKr.prefers_op_over_rebuild) measured again now
# that the rebuilt op has its Triton merge and weight-gradient kernels (runs 149-150): 0.75 (default) / 0 (off) /
# 0.4 / 0.75 again; the trainer's graphs against eager for the lokr case (run 151's check ran out of time there).
#   OUT=$OUT bash benchmarks/run_lokr_eye3.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos lokr-full --variants lyco"
step_table on 70 $A --baselines floor
(export LYCO_LOKR_EYE_POSITIONS=0; step_table off 105 $A --no-baselines)
(export LYCO_LOKR_EYE_POSITIONS=0.4; step_table t04 140 $A --no-baselines)
step_table on2 175 $A --no-baselines
graph_check 90 lokr
pack_out
