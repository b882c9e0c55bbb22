#!/usr/bin/env bash
# Issue 7, prepared in session 46 for the next (not run): LoKr full-matrix at SDXL — the rebuilt op's side region
# without the side streams' 32-SM target (LYCO_REBUILD_SIDE_SMS=0; change 174's switch) and the factor gradients
# straight from ∂y and x on linear layers (LYCO_LOKR_DIRECT_ROWS, change 173, off by default). Run 328's SDXL b1
# timeline: ∂W′ GEMMs ≈ 22.7 ms and their reductions 10.8 ms exposed of the step's ≈ 45 over the floor.
# SDXL b1: as built (floor alongside) / side SMs off / direct on / both / as built; SDXL b4: as built (floor
# alongside) / side SMs off / both.
#   OUT=$OUT bash benchmarks/run_direct47.sh      (carry .whl; ≈ 500 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
step_table x0 100 $A --jobs sdxl:1 --baselines floor
(export LYCO_REBUILD_SIDE_SMS=0; step_table xs0 150 $A --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table xd 200 $A --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf LYCO_REBUILD_SIDE_SMS=0; step_table xds0 250 $A --jobs sdxl:1 --no-baselines)
step_table x0b 300 $A --jobs sdxl:1 --no-baselines
step_table b0 390 $A --jobs sdxl:4 --baselines floor
(export LYCO_REBUILD_SIDE_SMS=0; step_table bs0 445 $A --jobs sdxl:4 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf LYCO_REBUILD_SIDE_SMS=0; step_table bds0 500 $A --jobs sdxl:4 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x0 xs0 xd xds0 x0b b0 bs0 bds0
pack_out
