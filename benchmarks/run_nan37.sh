#!/usr/bin/env bash
# Issue 7 GPU run of session 37 (sixth): run 271's NaN — the real trainer's SD1.5 b8 LoRA graph run with the frozen
# conv layout off raised "loss became NaN at step 21" (eager, and the layout-on runs, were finite). Again twice, the
# layout on once, and off with the late join and the factor tail off (the captured step's cross-stream suspects).
#   OUT=$OUT bash benchmarks/run_nan37.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
T="--models sd15 --algos lora --warmup 5 --steps 20 --batch 8"
trainer_row off8a 60 benchmarks/train_graph.py $T --conv-layout false
trainer_row off8b 60 benchmarks/train_graph.py $T --conv-layout false
trainer_row on8 60 benchmarks/train_graph.py $T
(export LYCO_LATE_JOIN=0 LYCO_FACTOR_TAIL=0; trainer_row off8-nolate 60 benchmarks/train_graph.py $T --conv-layout false)
grep -h "^| sd15" $OUT/*/train_graph.md
grep -h "NaN" $OUT/*/log.txt | cut -c1-120 | sort | uniq -c
pack_out
