#!/usr/bin/env bash
# Change 132 is not in the tree: apply benchmarks/experiments/fused_dgrad.patch first (patch -p1), and run with
# LYCO_FUSED_DGRAD=graph (the patch leaves it off by default; the runs had it on by default).
# Issue 7 GPU run 231 (session 31): the fused ∂x GEMM (change 132, LYCO_FUSED_DGRAD, lowrank._fused_dgrad) A/B/A at
# SD1.5 b1 LoRA beside PEFT and the floor, then on every row count (LYCO_FUSED_DGRAD_ROWS=0), then the trainer's
# graphs against eager with the kernel on every layer (check_cuda_graph sets both).
#   OUT=$OUT bash benchmarks/run_fused_dgrad.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
J="--jobs sd15:1 --algos lora $A"
step_table on 130 --baselines floor --variants lyco,peft $J
(export LYCO_FUSED_DGRAD=0; step_table off 200 --no-baselines --variants lyco $J)
step_table on2 270 --no-baselines --variants lyco $J
(export LYCO_FUSED_DGRAD_ROWS=0; step_table all 340 --no-baselines --variants lyco $J)
graph_check 150 lora,lora-fp16,lora-te,locon
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 all
pack_out
