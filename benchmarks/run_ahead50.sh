#!/usr/bin/env bash
# Taken out after this run (session 48 review, NOTES rows 178–179): the switches no longer exist; a record.
# Issue 7, prepared in session 47, run 333 (session 48): the rebuilt op's W′ built a layer ahead on the up stream —
# the forward's (FA: LYCO_REBUILD_FORWARD_AHEAD=1, change 178) and ∂x's in the backward (BA:
# LYCO_REBUILD_BACKWARD_AHEAD=1, change 179), both off by default — on lokr-full: SDXL b1 off (floor alongside) / FA /
# BA / FA+BA / off, SDXL b4 off / FA+BA, SD1.5 b1 off / FA+BA; then the trainer's CUDA graphs against eager for
# lokr-full and lokr with both on. run_ahead50b.sh has LoKr f8 and change 177's SDXL b4 leg.
#   OUT=$OUT bash benchmarks/run_ahead50.sh      (carry .whl; ≈ 500 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
FA=LYCO_REBUILD_FORWARD_AHEAD=1 BA=LYCO_REBUILD_BACKWARD_AHEAD=1
step_table x1 110 $A --jobs sdxl:1 --baselines floor
(export $FA; step_table x1f 150 $A --jobs sdxl:1 --no-baselines)
(export $BA; step_table x1b 190 $A --jobs sdxl:1 --no-baselines)
(export $FA $BA; step_table x1fb 230 $A --jobs sdxl:1 --no-baselines)
step_table x1o 270 $A --jobs sdxl:1 --no-baselines
step_table x4 310 $A --jobs sdxl:4 --no-baselines
(export $FA $BA; step_table x4fb 350 $A --jobs sdxl:4 --no-baselines)
step_table s1 380 $A --jobs sd15:1 --no-baselines
(export $FA $BA; step_table s1fb 410 $A --jobs sd15:1 --no-baselines)
(export $FA $BA; graph_check 90 lokr-full,lokr)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1f x1b x1fb x1o x4 x4fb s1 s1fb
pack_out
