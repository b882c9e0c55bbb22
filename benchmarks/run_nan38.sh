#!/usr/bin/env bash
# Issue 7 GPU run prepared in session 37 (not run yet): change 156 (the late join holds the wide layer's [∂x | ∂h/s])
# against runs 271–272's NaN — the real trainer's SD1.5 b8 LoRA as a graph four times with the late join on (3 of 4
# went NaN before the fix), then the frozen conv layout off at b8 (run 271's missing row) and the trainer's graphs
# against eager (the wide-layer cases; check_cuda_graph.py now also requires finite adapters).
#   OUT=$OUT bash benchmarks/run_nan38.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
T="--models sd15 --algos lora --warmup 5 --steps 20 --batch 8"
trainer_row b8a 90 benchmarks/train_graph.py $T
trainer_row b8b 60 benchmarks/train_graph.py $T
trainer_row b8c 60 benchmarks/train_graph.py $T
trainer_row b8d 60 benchmarks/train_graph.py $T
trainer_row off8 60 benchmarks/train_graph.py $T --conv-layout false
graph_check 120 lora,lora-te,locon,lokr
grep -h "^| sd15" $OUT/*/train_graph.md
grep -h "NaN" $OUT/*/log.txt | cut -c1-120 | sort | uniq -c
pack_out
