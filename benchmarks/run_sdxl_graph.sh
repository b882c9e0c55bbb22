#!/usr/bin/env bash
# Issue 7 GPU run 16: SDXL batch 4 at 1024 px as one CUDA graph (device time) for LoHa and LoKr against
# PEFT, with the floor; eager medians alongside. One device call, ≤ 3 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_sdxl_graph.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos loha,lokr \
  --variants lyco,peft --steps 10 --warmup 3 --graph --graph-steps 8 --baselines floor \
  --budget 160 --deadline $((S + 170)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sdxl" "$OUT/train_step.log" | cut -c1-160
echo "wall $(( $(date +%s) - S )) s"
