#!/usr/bin/env bash
# Issue 7 GPU run 249 (session 34): SD1.5 b1 — LoRA with a q/k/v group's forward weights stacked by one launch for
# one GEMM (change 142, LYCO_FORWARD_STACKED) on / off / on beside the floor; LoHa with its delta-path convs' ∂D by
# the batched GEMM (change 141, lowrank.conv_down) on / off (LYCO_CONV_DOWN_IM2COL); one LoKr replay's timeline; the
# trainer's graphs against eager for lora and loha (≈ 9 min).
#   OUT=$OUT bash benchmarks/run_stacked34.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table on 150 --baselines floor --variants lyco --algos lora $A
LYCO_FORWARD_STACKED=0 step_table off 190 --no-baselines --variants lyco --algos lora $A
step_table on2 230 --no-baselines --variants lyco --algos lora $A
step_table loha 285 --no-baselines --variants lyco --algos loha $A
LYCO_CONV_DOWN_IM2COL=0 step_table loha_off 330 --no-baselines --variants lyco --algos loha $A
step_table tr 400 --no-baselines --variants lyco --algos lokr $A --graph-trace lokr/lyco
gzip "$OUT"/tr/graph_trace_*.json
graph_check 110 lora,loha
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records on off on2 loha loha_off tr
pack_out
