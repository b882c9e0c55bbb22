#!/usr/bin/env bash
# Issue 7, session 49 (run 342): LoKr's ∂W′ block budget halved down to 32 programs a launch (change 183,
# LYCO_KRON_WGRAD_MIN_PROGRAMS=32: M; 0 by default then, 32 since this run) in the step beyond run 339's one leg
# (SD1.5 b1 22.79 against 22.98): SD1.5 b1 lokr-full as built / M / as built, SD1.5 b8 and SDXL b1 as built / M.
#   OUT=$OUT bash benchmarks/run_minprog57.sh      (carry .whl; ≈ 330 s and the start: run with timeout_s 480)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full --no-baselines"
M=LYCO_KRON_WGRAD_MIN_PROGRAMS=32
step_table s1 100 $A --jobs sd15:1
(export $M; step_table s1m 150 $A --jobs sd15:1)
step_table s1o 200 $A --jobs sd15:1
step_table s8 245 $A --jobs sd15:8
(export $M; step_table s8m 290 $A --jobs sd15:8)
step_table x1 345 $A --jobs sdxl:1
(export $M; step_table x1m 400 $A --jobs sdxl:1)
step_records s1 s1m s1o s8 s8m x1 x1m
pack_out
