#!/usr/bin/env bash
# Issue 7 GPU runs 115–116: lyco's real trainer after run 114's profile — the step-ahead loop (no host wait inside a step:
# the NaN guard as FlatAdamW.found_inf on the device, loss and grad norm read one step later) and FlatAdamW's
# zero_grad as _foreach_zero_; run 116 adds the batches' copies to the device without waits (non_blocking, pinned) — eager vs CUDA graph, LoRA and LoHa, 3 profiled steps each after the timed ones.
#   OUT=$OUT bash benchmarks/run_trainer_ahead.sh
mkdir -p "$OUT/tg"
BUDGET=330 bash benchmarks/run_train_graph.sh "$OUT/tg" --models sd15 --algos lora,loha --warmup 5 --steps 20 --profile 3
. benchmarks/_gpu_lib.sh
pack_out
