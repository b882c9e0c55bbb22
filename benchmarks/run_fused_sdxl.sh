#!/usr/bin/env bash
# Issue 7 GPU run 137 (NOTES change 91): the fused GEMM's shape rule on the other model — SDXL b4 1024 px LoRA as a
# graph with LYCO_FUSED_GEMM (its 64×64 level: 16384 rows × 640 channels) and without, the floor alongside.
#   OUT=$OUT bash benchmarks/run_fused_sdxl.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
X="--models sdxl --batches 4 --algos lora --variants lyco --rounds 1 --steps 3 --warmup 1 --graph --graph-steps 8"
step_table sdxl_on 150 $X --baselines floor
(export LYCO_FUSED_GEMM=0; step_table sdxl_off 230 $X --no-baselines)
pack_out
