#!/usr/bin/env bash
# Issue 7, session 48: runs 336 and 337, issued as one-line commands with these legs (the machine kept warm after run
# 335) — the block form of LoKr's ∂W′ reductions at 32768 elements a program against 16384 (run 335's default then;
# experiments/kron_wgrad_tiles.py had 32768 at 8 warps the best at SDXL). Part 1 (run 336): lokr-full SDXL b1 32768 /
# 16384 / 32768, SD1.5 b1 32768. Part 2 (run 337, the code's default then 32768): SDXL b4 32768 / 16384, SD1.5 b8,
# the trainer's graphs against eager.
#   OUT=$OUT bash benchmarks/run_wgrad53.sh 1|2      (carry .whl; ≈ 150 s each and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr-full --no-baselines"
if [ "${1:-1}" = 1 ]; then
  (export LYCO_KRON_WGRAD_BLOCK=32768; step_table x1w 100 $A --jobs sdxl:1)
  (export LYCO_KRON_WGRAD_BLOCK=16384; step_table x1 140 $A --jobs sdxl:1)
  (export LYCO_KRON_WGRAD_BLOCK=32768; step_table x1wo 180 $A --jobs sdxl:1)
  (export LYCO_KRON_WGRAD_BLOCK=32768; step_table s1w 210 $A --jobs sd15:1)
  step_records x1w x1 x1wo s1w
else
  (export LYCO_KRON_WGRAD_BLOCK=32768; step_table x4 75 $A --jobs sdxl:4)
  (export LYCO_KRON_WGRAD_BLOCK=16384; step_table x4b 120 $A --jobs sdxl:4)
  (export LYCO_KRON_WGRAD_BLOCK=32768; step_table s8 150 $A --jobs sd15:8)
  graph_check 60 lokr-full
  step_records x4 x4b s8
fi
pack_out
