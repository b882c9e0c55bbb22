#!/usr/bin/env bash
# Issue 7, prepared in session 47 for the next (not run): the rebuilt op's forward W′ built a layer ahead on the up
# stream (LYCO_REBUILD_FORWARD_AHEAD=1, change 178, off by default) — lokr-full SDXL b1 off / on / off (the floor
# alongside), SDXL b4 off / on, SD1.5 b1 off / on, and LoKr f8 at SDXL b1 (its rebuilt-op layers in the same order as
# its bypass ops' merged forwards) off / on; then SDXL b4 lokr-full with change 177's rule off (D0), the leg run 332
# missed; then the trainer's CUDA graphs against eager for lokr-full and lokr with it on.
#   OUT=$OUT bash benchmarks/run_ahead50.sh      (carry .whl; ≈ 500 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
FA=LYCO_REBUILD_FORWARD_AHEAD=1
step_table x1 110 $A --algos lokr-full --jobs sdxl:1 --baselines floor
(export $FA; step_table x1a 150 $A --algos lokr-full --jobs sdxl:1 --no-baselines)
step_table x1b 190 $A --algos lokr-full --jobs sdxl:1 --no-baselines
step_table x4 230 $A --algos lokr-full --jobs sdxl:4 --no-baselines
(export $FA; step_table x4a 270 $A --algos lokr-full --jobs sdxl:4 --no-baselines)
step_table s1 300 $A --algos lokr-full --jobs sd15:1 --no-baselines
(export $FA; step_table s1a 330 $A --algos lokr-full --jobs sd15:1 --no-baselines)
step_table k1 370 $A --algos lokr --jobs sdxl:1 --no-baselines
(export $FA; step_table k1a 410 $A --algos lokr --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=0; step_table x4d 445 $A --algos lokr-full --jobs sdxl:4 --no-baselines)
(export $FA; graph_check 80 lokr-full,lokr)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1a x1b x4 x4a s1 s1a k1 k1a x4d
pack_out
