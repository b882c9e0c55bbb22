#!/usr/bin/env bash
# Issue 7 GPU runs 19, 24, 30, 44, 57, 63, 69, 75 and 79: the whole SD1.5 b8 table at this commit in one run (every algorithm, lyco as
# mode "auto" picks, PEFT and LyCORIS eager where they implement it; eager and one CUDA graph).
# Peers skipped as in run_issue7.sh (LyCORIS where it was ≥ 40 % slower and not lighter than PEFT).
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1; bash benchmarks/run_table.sh
set -u
OUT=${OUT:-.}
S=$(date +%s)
python3 benchmarks/train_step.py --models sd15 --batches 8 \
  --algos lora,locon,loha,lokr,lokr-full,dora,oft,glora,ia3,full,boft \
  --variants lyco,peft,lycoris-eager \
  --skip lora/lycoris-eager,locon/lycoris-eager,lokr/lycoris-eager,lokr-full/lycoris-eager,oft/lycoris-eager \
  --steps 20 --warmup 4 --graph --graph-steps 15 --profile locon/lyco,lokr/lyco --profile-top 25 \
  --deadline $((S + 540)) --out "$OUT" > "$OUT/train_step.log" 2>&1
grep "÷best peer" "$OUT/train_step.log" | cut -c1-160
echo "wall $(( $(date +%s) - S )) s"
