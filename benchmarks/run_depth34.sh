#!/usr/bin/env bash
# Issue 7 GPU run 248 (session 34): SD1.5 b1 LoRA with the forward's merged weights built 1 / 2 / 3 / 1 ops ahead
# (LYCO_FORWARD_MERGED_DEPTH, change 133's deeper form: built and CPU-tested in session 31, never measured), the
# floor beside; then one LoHa and one LoKr replay's timeline at SD1.5 b1 (their floor ratios' misses, against run
# 239's floor-geglu) (≈ 4.5 min).
#   OUT=$OUT bash benchmarks/run_depth34.sh      (carry .whl)
. benchmarks/_gpu_lib.sh
trainer_env
export PYTHONPATH=/tmp/site:$PWD/src
A="--jobs sd15:1 --algos lora --rounds 1 --steps 2 --warmup 1 --graph --graph-steps 15"
step_table d1 60 --baselines floor --variants lyco $A
LYCO_FORWARD_MERGED_DEPTH=2 step_table d2 90 --no-baselines --variants lyco $A
LYCO_FORWARD_MERGED_DEPTH=3 step_table d3 120 --no-baselines --variants lyco $A
step_table d1b 150 --no-baselines --variants lyco $A
step_table tr 240 --no-baselines --variants lyco --jobs sd15:1 --algos loha,lokr --rounds 1 --steps 2 --warmup 1 \
  --graph --graph-steps 15 --graph-trace loha/lyco,lokr/lyco
gzip "$OUT"/tr/graph_trace_*.json
echo "lyco warnings: $(cat $OUT/*/train_step.log | grep -c 'RuntimeWarning: lyco')"
step_records d1 d2 d3 d1b tr
pack_out
