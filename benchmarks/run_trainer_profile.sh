#!/usr/bin/env bash
# Issue 7 GPU run 114: lyco's real trainer (benchmarks/train_graph.py: SD1.5-sized UNet, bf16 mixed precision, fp32
# adapter, text encoder trained, LoRA attn-mlp r16, batch 8, 512 px), eager vs CUDA graph, with 3 profiled steps each
# after the timed ones — where the trainer's step spends the time that train_step.py's bare step does not.
#   OUT=$OUT bash benchmarks/run_trainer_profile.sh
mkdir -p "$OUT/tg"
BUDGET=330 bash benchmarks/run_train_graph.sh "$OUT/tg" --models sd15 --algos lora --warmup 5 --steps 20 --profile 3
. benchmarks/_gpu_lib.sh
pack_out
