#!/usr/bin/env bash
# Issue 7 GPU run 8: every algorithm with mode = "auto" as decided from runs 6–7 (DoRA, (IA)³, GLoRA,
# BOFT, Full on the rebuilt op; the others on the bypass) against the peers, SD1.5 b8, eager and one
# CUDA graph; lyco-bypass beside the algorithms that changed. One device call, ≤ 9 min.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_rebuild3.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 \
  --algos dora,ia3,glora,lora,locon,loha,lokr,oft,full,boft \
  --variants lyco,lyco-bypass,peft,lycoris-eager \
  --skip lora/lyco-bypass,locon/lyco-bypass,loha/lyco-bypass,lokr/lyco-bypass,oft/lyco-bypass,full/lyco-bypass,lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,oft/lycoris-eager \
  --steps 20 --warmup 4 --graph --graph-steps 15 \
  --budget 520 --deadline $((S + 520)) --out "$OUT" > "$OUT/train_step.log" 2>&1
tail -40 "$OUT/train_step.log"
echo "wall $(( $(date +%s) - S )) s"
