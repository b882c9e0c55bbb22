#!/usr/bin/env bash
# Issue 7 GPU run 7: DoRA and (IA)³ on the rebuilt op with their own backward (no nested autograd),
# against the bypass and the peers; SD1.5 b8, then SDXL b4 while time remains. One device call.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_rebuild2.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 --algos dora,ia3 \
  --variants lyco,lyco-bypass,lyco-rebuild,lyco-dora-detach,peft,lycoris-eager \
  --skip dora/lyco-rebuild,ia3/lyco-bypass \
  --steps 20 --warmup 4 --graph --graph-steps 15 --rounds 2 \
  --budget 300 --deadline $((S + 300)) --out "$OUT" > "$OUT/train_step.log" 2>&1
tail -30 "$OUT/train_step.log"
python3 benchmarks/train_step.py --models sdxl --batches 4 --algos dora,ia3 \
  --variants lyco,lyco-bypass,lyco-rebuild,peft,lycoris-eager \
  --skip dora/lyco-rebuild,ia3/lyco-bypass \
  --steps 12 --warmup 3 --graph --graph-steps 10 \
  --budget 250 --deadline $((S + 540)) --tag _sdxl --out "$OUT" > "$OUT/train_step_sdxl.log" 2>&1
tail -25 "$OUT/train_step_sdxl.log"
echo "wall $(( $(date +%s) - S )) s"
