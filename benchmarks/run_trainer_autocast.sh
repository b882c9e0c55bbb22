#!/usr/bin/env bash
# Issue 7 GPU run 117 (NOTES change 82): lyco's real trainer with bf16 under autocast (the default) and without it
# ([train] autocast = false: the bf16 model as it is, the fp32 adapter cast to bf16) in the same run, LoRA, eager vs
# CUDA graph, 3 profiled steps each; then the trainer's graphs against eager on the tiny model (the step-ahead loop).
#   OUT=$OUT bash benchmarks/run_trainer_autocast.sh
mkdir -p "$OUT/ac" "$OUT/noac"
BUDGET=150 bash benchmarks/run_train_graph.sh "$OUT/ac" --models sd15 --algos lora --warmup 5 --steps 20 --profile 3
BUDGET=150 bash benchmarks/run_train_graph.sh "$OUT/noac" --models sd15 --algos lora --warmup 5 --steps 20 --profile 3 \
  --no-autocast
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
. benchmarks/_gpu_lib.sh
graph_check 120 lora,locon,loha,lora-fp16
pack_out
