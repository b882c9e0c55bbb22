#!/usr/bin/env bash
# Issue 7, session 48: LoKr's ∂W′ reductions in the block form (factor_triton._kron_wgrad_block_kernel, the default at
# 16384 elements a program; LYCO_KRON_WGRAD_BLOCK=0: the loop form before it) — first alone per layer shape at more
# budgets and warps (experiments/kron_wgrad_tiles.py), then lokr-full in the step A/B/A: SDXL b1 block (floor
# alongside) / loop / block, SD1.5 b1 and b8 block / loop; SDXL b4 as built / without change 177's direct factor
# gradients (LYCO_LOKR_DIRECT_ROWS=0: its b4 leg, not measured in session 47); the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_wgrad52.sh      (carry .whl; ≈ 500 s and the start: run with timeout_s 600)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
timeout 120 python3 benchmarks/experiments/kron_wgrad_tiles.py --out $OUT/kron_wgrad_tiles.json \
  > $OUT/kron_wgrad_tiles.log 2>&1
echo "wgrad tiles rc=$? wall $(( $(date +%s) - S )) s"; grep '"summed_ms' $OUT/kron_wgrad_tiles.log
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full"
L=LYCO_KRON_WGRAD_BLOCK=0
step_table x1 130 $A --jobs sdxl:1 --baselines floor
(export $L; step_table x1L 170 $A --jobs sdxl:1 --no-baselines)
step_table x1o 210 $A --jobs sdxl:1 --no-baselines
step_table s1 240 $A --jobs sd15:1 --no-baselines
(export $L; step_table s1L 270 $A --jobs sd15:1 --no-baselines)
step_table s8 305 $A --jobs sd15:8 --no-baselines
(export $L; step_table s8L 340 $A --jobs sd15:8 --no-baselines)
step_table x4 385 $A --jobs sdxl:4 --no-baselines
(export LYCO_LOKR_DIRECT_ROWS=0; step_table x4d 430 $A --jobs sdxl:4 --no-baselines)
graph_check 70 lokr-full
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x1L x1o s1 s1L s8 s8L x4 x4d
pack_out
