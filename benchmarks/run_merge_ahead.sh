#!/usr/bin/env bash
# Issue 7 GPU run 97 (experiment; the prefetch code was removed after it — it lost, NOTES change 69): the bypass op's merged weight W + s·U·D for ∂x — built ahead by the following
# op's backward on the side stream (LYCO_MERGE_AHEAD=1), by lowrank_triton.add_lowrank in one pass instead of a
# copy plus a beta=1 GEMM (LYCO_MERGE_KERNEL=1), both, against neither. SD1.5 b8 graphs.
. benchmarks/_gpu_lib.sh
ARGS="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
step_table base 90 $ARGS --algos lora,locon,loha --baselines floor
(export LYCO_MERGE_AHEAD=1; step_table ahead 165 $ARGS --algos lora,locon,loha --no-baselines)
(export LYCO_MERGE_KERNEL=1; step_table kernel 240 $ARGS --algos lora,locon,loha --no-baselines)
(export LYCO_MERGE_AHEAD=1 LYCO_MERGE_KERNEL=1; step_table both 315 $ARGS --algos lora,locon,loha --no-baselines)
step_table base2 390 $ARGS --algos lora,locon,loha --no-baselines
