#!/usr/bin/env bash
# Issue 7 GPU run 246 (session 33): change 139 — the forward's merged weights kept for the backward's ∂x
# (lowrank._keep_merged, LYCO_KEEP_MERGED, captured steps by default): run 243's timeline of SD1.5 b1 LoRA has 166
# builds, 0.40 ms exposed, about half of them the backward's rebuilds of the forward's weights. On / off / on / off at
# SD1.5 b1 beside the floor, on / off at SD1.5 b8 and SDXL b1 (time and the graph's peak: each kept W′ lives from its
# forward to its backward), the trainer's graphs against eager (≈ 7 min).
#   OUT=$OUT bash benchmarks/run_keep_merged.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 --algos lora --no-baselines --variants lyco"
step_table on 60 --baselines floor --variants lyco --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15 \
  --algos lora --jobs sd15:1
(export LYCO_KEEP_MERGED=0; step_table off 90 $A --jobs sd15:1)
step_table on2 120 $A --jobs sd15:1
(export LYCO_KEEP_MERGED=0; step_table off2 150 $A --jobs sd15:1)
step_table s8 185 $A --jobs sd15:8
(export LYCO_KEEP_MERGED=0; step_table s8off 220 $A --jobs sd15:8)
step_table x1 270 $A --jobs sdxl:1
(export LYCO_KEEP_MERGED=0; step_table x1off 320 $A --jobs sdxl:1)
graph_check 60 lora
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 off2 s8 s8off x1 x1off
pack_out
