#!/usr/bin/env bash
# Issue 7, session 48: LoKr f8 (the main goal table's column) with change 181 — its rebuilt-op layers' ∂W′ reductions
# in the block form (as built) against the loop form (LYCO_KRON_WGRAD_BLOCK=0): SDXL b1 as built (floor alongside) /
# loop / as built.
#   OUT=$OUT bash benchmarks/run_wgrad54.sh      (carry .whl; ≈ 150 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr --jobs sdxl:1"
step_table x1 100 $A --baselines floor
(export LYCO_KRON_WGRAD_BLOCK=0; step_table x1L 135 $A --no-baselines)
step_table x1o 170 $A --no-baselines
step_records x1 x1L x1o
pack_out
