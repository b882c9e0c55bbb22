#!/usr/bin/env bash
# Issue 7 GPU run 120: lyco's real trainer on an SDXL-sized UNet (benchmarks/train_graph.py --models sdxl: 1024 px,
# batch 4, LoRA r16 attn-mlp, both text encoders trained), bf16 with autocast (the default) and without it
# ([train] autocast = false), eager vs CUDA graph.
#   OUT=$OUT bash benchmarks/run_trainer_sdxl.sh
mkdir -p "$OUT/ac" "$OUT/noac"
BUDGET=200 bash benchmarks/run_train_graph.sh "$OUT/ac" --models sdxl --algos lora --warmup 4 --steps 12
BUDGET=200 bash benchmarks/run_train_graph.sh "$OUT/noac" --models sdxl --algos lora --warmup 4 --steps 12 --no-autocast
. benchmarks/_gpu_lib.sh
pack_out
