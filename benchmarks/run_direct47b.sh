#!/usr/bin/env bash
# Issue 7, prepared in session 46, run in session 47 as run 330 ("as built" then: change 175's defaults, since
# changed by changes 176–177): run_direct47.sh's switches at SD1.5 — lokr-full at b1 and
# b8 as built (floor alongside) / direct on (LYCO_LOKR_DIRECT_ROWS=inf) / the rebuilt op's side region without the
# 32-SM target (LYCO_REBUILD_SIDE_SMS=0), and LoKr f8 at b8 (its narrow layers on the rebuilt op) as built / without
# it; the trainer's CUDA graphs against eager for lokr-full with the side-SM and early-fork switches on (the direct
# form left out at run time: run 329 had it losing);
# then both factor-gradient forms alone per layer shape (experiments/kron_direct_shapes.py: where the rows pay, for
# DIRECT_ROWS).
#   OUT=$OUT bash benchmarks/run_direct47b.sh      (carry .whl; ≈ 460 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
step_table s1 55 $A --algos lokr-full --jobs sd15:1 --baselines floor
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table s1d 85 $A --algos lokr-full --jobs sd15:1 --no-baselines)
(export LYCO_REBUILD_SIDE_SMS=0; step_table s1s0 115 $A --algos lokr-full --jobs sd15:1 --no-baselines)
step_table s8 165 $A --algos lokr-full,lokr --jobs sd15:8 --baselines floor
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table s8d 195 $A --algos lokr-full --jobs sd15:8 --no-baselines)
(export LYCO_REBUILD_SIDE_SMS=0; step_table s8s0 250 $A --algos lokr-full,lokr --jobs sd15:8 --no-baselines)
(export LYCO_REBUILD_SIDE_SMS=0 LYCO_REBUILD_EARLY_FORK=1; graph_check 80 lokr-full)
timeout 120 python3 benchmarks/experiments/kron_direct_shapes.py --out $OUT/kron_direct_shapes.json \
  > $OUT/kron_direct_shapes.log 2>&1
echo "shapes rc=$?"; grep '"summed_ms' $OUT/kron_direct_shapes.log
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records s1 s1d s1s0 s8 s8d s8s0
pack_out
