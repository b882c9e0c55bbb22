#!/usr/bin/env bash
# Issue 7, session 49 (run 341): LoKr's merged weight in tiles (factor_triton._kron_merge_tile_kernel, change 184;
# LYCO_KRON_MERGE_TILE = elements a program, 0 — the flat form — by default) — first alone per layer shape beside the
# flat form (experiments/kron_merge_tiles.py: three flat blocks, eight tile/column/warp configurations), then in the
# step at 4096 elements (T): SDXL b1 lokr-full as built (floor alongside) / T / as built, LoKr f8 as built / T,
# SD1.5 b1 and b8 and SDXL b4 lokr-full as built / T; the trainer's graphs against eager with T.
# Run 340's timeline of SDXL b1 lokr-full: _kron_merge_kernel 1495× 13.15 ms, 9.14 exposed.
# Ran as run 341: the tiled form lost alone and in the step and was taken out of the library after it (it lives in
# experiments/kron_merge_tiles.py; LYCO_KRON_MERGE_TILE no longer exists, so T's legs now repeat the build). The legs
# took ≈ 40 s each, not 30: the graph check ran out of the 600 s (lokr-full ok, lokr cut), results.tgz was not packed,
# SD1.5 b1 with T was skipped by its deadline.
#   OUT=$OUT bash benchmarks/run_merge56.sh      (carry .whl; ≈ 600 s and the start: past timeout_s 600, split it)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
experiment 90 kron_merge_tiles
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
T=LYCO_KRON_MERGE_TILE=4096
step_table x1 160 $A --algos lokr-full --jobs sdxl:1 --baselines floor
(export $T; step_table x1t 195 $A --algos lokr-full --jobs sdxl:1 --no-baselines)
step_table x1o 230 $A --algos lokr-full --jobs sdxl:1 --no-baselines
step_table f1 265 $A --algos lokr --jobs sdxl:1 --no-baselines
(export $T; step_table f1t 300 $A --algos lokr --jobs sdxl:1 --no-baselines)
step_table s1 330 $A --algos lokr-full --jobs sd15:1 --no-baselines
(export $T; step_table s1t 360 $A --algos lokr-full --jobs sd15:1 --no-baselines)
step_table s8 390 $A --algos lokr-full --jobs sd15:8 --no-baselines
(export $T; step_table s8t 420 $A --algos lokr-full --jobs sd15:8 --no-baselines)
step_table x4 460 $A --algos lokr-full --jobs sdxl:4 --no-baselines
(export $T; step_table x4t 500 $A --algos lokr-full --jobs sdxl:4 --no-baselines)
(export $T; graph_check 80 lokr-full,lokr)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1t x1o f1 f1t s1 s1t s8 s8t x4 x4t
pack_out
