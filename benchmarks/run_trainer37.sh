#!/usr/bin/env bash
# Issue 7 GPU run of session 37 (fifth): the real trainer (benchmarks/train_graph.py, eager and graph) with the
# frozen conv layout on ([train] conv_weights_channels_last = "auto", the default) and off, SD1.5-sized LoRA at
# batch 1 and 8 — the user-facing step time of change 153, optimizer and host included.
#   OUT=$OUT bash benchmarks/run_trainer37.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
T="--models sd15 --algos lora --warmup 5 --steps 20"
trainer_row on1 110 benchmarks/train_graph.py $T --batch 1
trainer_row off1 110 benchmarks/train_graph.py $T --batch 1 --conv-layout false
trainer_row on8 110 benchmarks/train_graph.py $T --batch 8
trainer_row off8 110 benchmarks/train_graph.py $T --batch 8 --conv-layout false
grep -h "^| sd15" $OUT/*/train_graph.md
pack_out
