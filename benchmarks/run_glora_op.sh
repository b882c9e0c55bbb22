#!/usr/bin/env bash
# Issue 7 GPU run 154: GLoRA in the op's steps as a rank-2r LoRA through the bypass op, U = [W·A1 | B1],
# D = [A2 ; B2] (GLoRA.bypass_op; the host's op-over-rebuild question) instead of the rebuilt op and its
# weight-gradient GEMM. SD1.5 b8 glora as graphs, LyCORIS alongside in the first leg; A/B/A against
# LYCO_GLORA_OP=0; the trainer's graphs against eager (glora).
#   OUT=$OUT bash benchmarks/run_glora_op.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--models sd15 --batches 8 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --algos glora"
step_table on 120 $A --variants lyco,lycoris-eager --baselines floor
(export LYCO_GLORA_OP=0; step_table off 160 $A --variants lyco --no-baselines)
step_table on2 200 $A --variants lyco --no-baselines
graph_check 80 glora
pack_out
