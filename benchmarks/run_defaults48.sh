#!/usr/bin/env bash
# Issue 7, session 47: change 176's defaults (the rebuilt op's side region without the side streams' 32-SM target,
# LYCO_REBUILD_SIDE_SMS=0, and forked before the rebuild of W′ in captured steps, LYCO_REBUILD_EARLY_FORK=graph)
# measured as built at all four sizes for both LoKr configurations (floor alongside), against the early fork off
# (E0) and, for LoKr f8 at b1 (its narrow layers on the rebuilt op), against change 175's defaults (OLD).
#   OUT=$OUT bash benchmarks/run_defaults48.sh      (carry .whl; ≈ 520 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco"
E0=LYCO_REBUILD_EARLY_FORK=0 OLD="LYCO_REBUILD_SIDE_SMS=graph LYCO_REBUILD_EARLY_FORK=0"
step_table x1 130 $A --algos lokr-full,lokr --jobs sdxl:1 --baselines floor
(export $E0; step_table x1e 200 $A --algos lokr-full,lokr --jobs sdxl:1 --no-baselines)
(export $OLD; step_table x1o 235 $A --algos lokr --jobs sdxl:1 --no-baselines)
step_table x4 310 $A --algos lokr-full,lokr --jobs sdxl:4 --baselines floor
(export $E0; step_table x4e 340 $A --algos lokr-full --jobs sdxl:4 --no-baselines)
step_table s1 400 $A --algos lokr-full,lokr --jobs sd15:1 --baselines floor
(export $E0; step_table s1e 425 $A --algos lokr-full --jobs sd15:1 --no-baselines)
(export $OLD; step_table s1o 450 $A --algos lokr --jobs sd15:1 --no-baselines)
step_table s8 510 $A --algos lokr-full,lokr --jobs sd15:8 --baselines floor
(export $E0; step_table s8e 535 $A --algos lokr-full --jobs sd15:8 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1e x1o x4 x4e s1 s1e s1o s8 s8e
pack_out
