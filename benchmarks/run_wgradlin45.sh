#!/usr/bin/env bash
# Issue 7, session 45: LoKr's grouped linear ∂B by wgrad_triton's kernel (LYCO_WGRAD_LINEAR, change 171) — run 317's
# makers put 424 of SDXL b1 LoKr's split-K GEMMs and their splitKreduce launches on (8192 × 16)ᵀ(8192 × 160); run 318
# timed that shape alone at 7.46 µs (cuBLAS at 32 SMs) against 6.05. The trainer's graphs against eager for lokr, then
# SDXL b1 LoKr on / off / on (floor in the first leg), SD1.5 b1 LoKr on / off / on (floor in the first leg).
#   OUT=$OUT bash benchmarks/run_wgradlin45.sh      (carry .whl; ≈ 330 s and the start)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
graph_check 70 lokr
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 20 --variants lyco --algos lokr"
step_table x1 155 $A --jobs sdxl:1 --baselines floor
(export LYCO_WGRAD_LINEAR=0; step_table x0 195 $A --jobs sdxl:1 --no-baselines)
step_table x1b 235 $A --jobs sdxl:1 --no-baselines
step_table s1 280 $A --jobs sd15:1 --baselines floor
(export LYCO_WGRAD_LINEAR=0; step_table s0 310 $A --jobs sd15:1 --no-baselines)
step_table s1b 340 $A --jobs sd15:1 --no-baselines
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records x1 x0 x1b s1 s0 s1b
pack_out
