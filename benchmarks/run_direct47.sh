#!/usr/bin/env bash
# Issue 7, prepared in session 46 for the next (not run): LoKr full-matrix's factor gradients straight from ∂y and x
# on linear layers (lokr.kron_linear_grads, off by default: LYCO_LOKR_DIRECT_ROWS=0) against the ∂W′ path. Run 328's
# SDXL b1 timeline: ∂W′ GEMMs ≈ 22.7 ms and their reductions 10.8 ms exposed of the step's ≈ 45 over the floor.
# SDXL b1 at c = 0 (floor alongside) / inf / 4 / 0, then SDXL b4 at inf / 0 (floor alongside).
#   OUT=$OUT bash benchmarks/run_direct47.sh      (carry .whl; ≈ 420 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
(export LYCO_LOKR_DIRECT_ROWS=0; step_table x0 100 $A --jobs sdxl:1 --baselines floor)
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table xinf 150 $A --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=4; step_table x4 200 $A --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=0; step_table x0b 250 $A --jobs sdxl:1 --no-baselines)
(export LYCO_LOKR_DIRECT_ROWS=inf; step_table binf 330 $A --jobs sdxl:4 --baselines floor)
(export LYCO_LOKR_DIRECT_ROWS=0; step_table b0 400 $A --jobs sdxl:4 --no-baselines)
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x0 xinf x4 x0b binf b0
pack_out
