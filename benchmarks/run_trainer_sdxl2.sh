#!/usr/bin/env bash
# Issue 7 GPU run 121: lyco's real trainer on the SDXL-sized UNet (train_graph.py --models sdxl), LoHa r8 and LoKr f8
# r8 (attn-mlp, both text encoders trained), bf16 with autocast (the default), eager vs CUDA graph.
#   OUT=$OUT bash benchmarks/run_trainer_sdxl2.sh
mkdir -p "$OUT/tg"
BUDGET=260 bash benchmarks/run_train_graph.sh "$OUT/tg" --models sdxl --algos loha,lokr --warmup 4 --steps 12
. benchmarks/_gpu_lib.sh
pack_out
