#!/usr/bin/env bash
# Issue 7 GPU run of session 38 (short: the session's device time was nearly spent): LYCO_AHEAD_LATE — an op that
# returns its ∂U joins only the ∂U, leaving the merged weight it built ahead after it on the up stream for that
# weight's consumer (run 277: cuDNN attention's backward memset waited for to_out's builds of the q/k/v weights).
# SD1.5 b1 LoRA on the frozen conv layout, on / off, then the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_ahead38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --frozen-cl rule --variants lyco --algos lora"
step_table on 60 $A --no-baselines
(export LYCO_AHEAD_LATE=0; step_table off 110 $A --no-baselines)
step_table on2 160 $A --no-baselines
graph_check 75 lora
step_records on off on2
pack_out
