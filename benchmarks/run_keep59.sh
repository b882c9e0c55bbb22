#!/usr/bin/env bash
# Issue 7, prepared in session 49 for the next (not run): the rebuilt op keeps the forward's W′ for its backward on
# the layers of at most LYCO_REBUILD_KEEP_W elements instead of rebuilding it (rebuild._keep_w, change 185; 0 by
# default). SDXL b1 lokr-full as built (floor alongside) / K (up to 1280 × 1280: 1638400 elements) / as built; SD1.5
# b1 lokr-full as built / K; LoKr f8 SDXL b1 as built / K; the trainer's graphs against eager with K. The graph peaks
# say what it costs in memory (by arithmetic ≈ 1.36 GB at SDXL: rebuild._keep_w).
#   OUT=$OUT bash benchmarks/run_keep59.sh      (carry .whl; ≈ 440 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
K=LYCO_REBUILD_KEEP_W=1638400
step_table x1 130 $A --algos lokr-full --jobs sdxl:1 --baselines floor
(export $K; step_table x1k 185 $A --algos lokr-full --jobs sdxl:1 --no-baselines)
step_table x1o 235 $A --algos lokr-full --jobs sdxl:1 --no-baselines
step_table s1 280 $A --algos lokr-full --jobs sd15:1 --no-baselines
(export $K; step_table s1k 320 $A --algos lokr-full --jobs sd15:1 --no-baselines)
step_table f1 380 $A --algos lokr --jobs sdxl:1 --no-baselines
(export $K; step_table f1k 430 $A --algos lokr --jobs sdxl:1 --no-baselines)
(export $K; graph_check 70 lokr-full)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1k x1o s1 s1k f1 f1k
pack_out
