#!/usr/bin/env bash
# Issue 7 GPU run 13: LoKr (factor 8, and full-matrix) on the rebuilt op with its own Kronecker backward
# (lokr.py _KronBuild) — lyco-rebuild — against the delta path (lyco = mode "auto" at this commit) and
# PEFT, SD1.5 b8, eager and one CUDA graph, two rounds. One device call, ≤ 5 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_lokr_rebuild.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 --algos lokr,lokr-full \
  --variants lyco,lyco-rebuild,peft --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 \
  --budget 240 --deadline $((S + 280)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "^\[sd15" "$OUT/train_step.log" | cut -c1-175
echo "wall $(( $(date +%s) - S )) s"
