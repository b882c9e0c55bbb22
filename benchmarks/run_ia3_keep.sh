#!/usr/bin/env bash
# Issue 7 GPU run 162 (session 21): (IA)³'s output mode keeping the output — ∂w from ∂y and y by two Triton launches
# (scale_triton) instead of the rebuilt op's weight-gradient GEMM, on linear layers with ≥ 512 inputs
# (ia3._keep_output, LYCO_IA3_KEEP_OUTPUT, captured steps by default). A/B/A as graphs at SD1.5 b8, SD1.5 b1 and SDXL
# b4 (PEFT alongside in the first leg), then every linear layer on it (LYCO_IA3_KEEP_OUTPUT_MIN_IN=0) at SD1.5 b8 and
# b1; the trainer's graphs against eager (ia3, ia3-fp16).
#   OUT=$OUT bash benchmarks/run_ia3_keep.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:8,sd15:1,sdxl:4 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos ia3"
step_table on 120 $A --variants lyco,peft --baselines floor
(export LYCO_IA3_KEEP_OUTPUT=0; step_table off 190 $A --variants lyco --no-baselines)
step_table on2 260 $A --variants lyco --no-baselines
(export LYCO_IA3_KEEP_OUTPUT_MIN_IN=0; step_table all 300 --jobs sd15:8,sd15:1 --rounds 1 --steps 2 --warmup 1 \
  --graph --graph-steps 15 --algos ia3 --variants lyco --no-baselines)
graph_check 90 ia3,ia3-fp16
pack_out
