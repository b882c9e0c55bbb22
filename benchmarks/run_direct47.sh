#!/usr/bin/env bash
# Issue 7, prepared in session 46, run in session 47 as run 329 ("as built" then: change 175's defaults, since
# changed by changes 176–177): LoKr full-matrix at SDXL with the rebuilt op's three
# prepared switches, each off by default — its side region without the side streams' 32-SM target
# (LYCO_REBUILD_SIDE_SMS=0, change 174), the factor gradients straight from ∂y and x on linear layers
# (LYCO_LOKR_DIRECT_ROWS=inf, change 173) and the side region forked before the rebuild of W′
# (LYCO_REBUILD_EARLY_FORK=1, change 175). Run 328's SDXL b1 timeline: ∂W′ GEMMs ≈ 22.7 ms and their reductions
# 10.8 ms exposed of the step's ≈ 45 over the floor, the merges 7.28 ms exposed.
# SDXL b1: as built (floor alongside) / S / S+D / S+D+E / S+E / as built; SDXL b4: as built (floor alongside) / S /
# S+D+E (S, D, E: the three switches; $SM, $DR, $EF below).
#   OUT=$OUT bash benchmarks/run_direct47.sh      (carry .whl; ≈ 540 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
SM=LYCO_REBUILD_SIDE_SMS=0 DR=LYCO_LOKR_DIRECT_ROWS=inf EF=LYCO_REBUILD_EARLY_FORK=1  # not S: _gpu_lib.sh's start
step_table x0 100 $A --jobs sdxl:1 --baselines floor
(export $SM; step_table xs 150 $A --jobs sdxl:1 --no-baselines)
(export $SM $DR; step_table xsd 200 $A --jobs sdxl:1 --no-baselines)
(export $SM $DR $EF; step_table xsde 250 $A --jobs sdxl:1 --no-baselines)
(export $SM $EF; step_table xse 300 $A --jobs sdxl:1 --no-baselines)
step_table x0b 350 $A --jobs sdxl:1 --no-baselines
step_table b0 440 $A --jobs sdxl:4 --baselines floor
(export $SM; step_table bs 490 $A --jobs sdxl:4 --no-baselines)
(export $SM $DR $EF; step_table bsde 515 $A --jobs sdxl:4 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x0 xs xsd xsde xse x0b b0 bs bsde
pack_out
