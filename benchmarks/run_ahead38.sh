#!/usr/bin/env bash
# Issue 7 GPU run of session 38 (short: the session's device time was nearly spent): LYCO_AHEAD_LATE — an op that
# returns its ∂U joins only the ∂U, leaving the merged weight it built ahead after it on the up stream for that
# weight's consumer (run 277: cuDNN attention's backward memset waited for to_out's builds of the q/k/v weights).
# SD1.5 b1 LoRA on the frozen conv layout, on / off / on, then the trainer's graphs against eager. Run 278 ran the
# first form (the switch then on by default, deadlines 60/110/160): the first leg's 89 s (cold compile) left the off
# leg skipped; on 17.74 / 17.74 ms. Off by default since; the legs set it.
# Session 39: the switch is gone (change 162, after run 282's same-run A/B: no gain); this script is the record of
# run 278 and now times the same step in every leg.
#   OUT=$OUT bash benchmarks/run_ahead38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --frozen-cl rule --variants lyco --algos lora"
(export LYCO_AHEAD_LATE=graph; step_table on 120 $A --no-baselines)
step_table off 170 $A --no-baselines
(export LYCO_AHEAD_LATE=graph; step_table on2 220 $A --no-baselines)
(export LYCO_AHEAD_LATE=1; graph_check 75 lora)
step_records on off on2
pack_out
